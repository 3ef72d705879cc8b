"""Lock-wait bounds derived from the lease, and the server version checks of SKIP
LOCKED, without a server."""

from __future__ import annotations

import pytest

from meepo.ledger.bounds import Bounds
from meepo.ledger.engine import skip_locked_problem


def test_bounds_derive_from_the_lease() -> None:
    b = Bounds.from_lease(20.0)
    assert b.lock_wait < 20.0 / 3 and b.statement < 20.0 / 3 and b.network <= 20.0 / 3
    assert b.mysql_session(True) == [
        "SET SESSION innodb_lock_wait_timeout = 3, max_statement_time = 5.000"
    ]
    assert "SET lock_timeout = 3333" in b.postgres_session()
    assert Bounds.from_lease(0.3).lock_wait == 0.5  # floors for very short leases


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("10.11.6-MariaDB-0+deb12u1", True),
        ("10.6.0-MariaDB", True),
        ("10.5.23-MariaDB-log", False),
        ("8.0.36", True),
        ("5.7.44-log", False),
    ],
)
def test_skip_locked_version_check_names_the_version(version: str, ok: bool) -> None:
    problem = skip_locked_problem(version)
    if ok:
        assert problem is None
    else:
        assert problem is not None and version in problem and "SKIP LOCKED" in problem
