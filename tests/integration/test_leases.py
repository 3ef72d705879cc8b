"""The host's estimate of the database's clock (docs/design.md invariant 8).

The statements' own cases (leases set and judged by the database's clock, the reaper's
locked step re-checking expiry, claim tokens that cannot repeat after a failover,
heartbeats that never wait on another job's row lock) run against every ledger driver
in tests/test_conformance.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meepo.connect import engine_for
from meepo.ledger import Ledger
from meepo.ledger.clock import ServerClock, host_now


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = engine_for(db_url)
    yield Ledger(engine, "meepo_jobs")


def test_server_clock_offset_is_measured(ledger: Ledger) -> None:
    clock = ServerClock(ledger.engine, ledger.driver.db_now)
    offset = clock.measure()
    if clock.embedded:
        assert offset == 0.0
    else:
        assert clock.rtt is not None
        assert abs(offset) < 1.0  # the test's servers run on this host
    assert abs((clock.now() - host_now()).total_seconds() - offset) < 1.0
