"""Schedule declarations and their fire times and misfire plans, computed without a ledger."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from itertools import islice
from typing import Any

import pytest

from meepo.schedule import Spec, plan

UTC = timezone.utc


def secs(base: datetime, *offsets: int) -> list[datetime]:
    return [base + timedelta(seconds=s) for s in offsets]


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: Spec.cron("a", "not cron", b"", "d"), "invalid cron expression 'not cron'"),
        (lambda: Spec.cron("a", "61 * * * *", b"", "d"), "invalid cron expression '61 * * * *'"),
        (lambda: Spec.cron("a", "* * * * * * *", b"", "d"), "not 7"),
        (lambda: Spec.cron("a", "* * * * *", b"", "d", tz="Mars/Olympus"), "'Mars/Olympus'"),
        (lambda: Spec.every("a", 0, b"", "d"), "positive number of seconds"),
        (lambda: Spec.every("a", -1.5, b"", "d"), "positive number of seconds"),
        (lambda: Spec.every("a", "10", b"", "d"), "seconds (a number) or a timedelta"),
        (lambda: Spec.every("", 1, b"", "d"), "invalid schedule name ''"),
        (lambda: Spec.every("a b", 1, b"", "d"), "invalid schedule name 'a b'"),
        (lambda: Spec.every("x" * 129, 1, b"", "d"), "invalid schedule name"),
        (lambda: Spec.every("a", 1, b"", "d", start=datetime(2030, 1, 1)), "naive"),
        (lambda: Spec.every("a", 1, b"", "d", until=datetime(2030, 1, 1)), "naive"),
        (
            lambda: Spec.every(
                "a",
                1,
                b"",
                "d",
                start=datetime(2030, 1, 2, tzinfo=UTC),
                until=datetime(2030, 1, 1, tzinfo=UTC),
            ),
            "is before start",
        ),
        (lambda: Spec.every("a", 1, b"", "d", misfire="twice"), "unknown misfire policy"),
    ],
)
def test_invalid_declarations_are_clear_value_errors(make: Callable[[], Any], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert needle in str(info.value)


def test_fire_times_cron_every_tz_start_until() -> None:
    t = datetime(2026, 3, 28, 0, 0, tzinfo=UTC)
    paris = Spec.cron("p", "0 9 * * *", b"", "d", tz="Europe/Paris")
    # 09:00 Paris is 08:00 UTC before the switch to summer time, 07:00 after it.
    assert list(islice(paris.fires(t), 2)) == [
        datetime(2026, 3, 28, 8, tzinfo=UTC),
        datetime(2026, 3, 29, 7, tzinfo=UTC),
    ]
    seconds = Spec.cron("s", "* * * * * */15", b"", "d")  # sixth field: the second
    assert seconds.first_at_or_after(t + timedelta(seconds=1)) == t + timedelta(seconds=15)
    every = Spec.every("e", timedelta(minutes=30), b"", "d")  # anchored on the epoch
    assert every.first_at_or_after(t + timedelta(minutes=1)) == t + timedelta(minutes=30)
    bounded = Spec.every(
        "b", 10, b"", "d", start=t + timedelta(seconds=3), until=t + timedelta(seconds=33)
    )
    assert list(bounded.fires(t)) == secs(t, 3, 13, 23, 33)


def test_misfire_plans() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    now = t + timedelta(seconds=20)
    # grace 2.5 s: the fires 0..17 are missed, 18..20 on time.
    for misfire, want in [
        ("one", secs(t, 17, 18, 19, 20)),  # the latest missed fire stands for them all
        ("all", secs(t, *range(21))),
        ("skip", secs(t, 18, 19, 20)),
    ]:
        p = plan(Spec.every("m", 1, b"", "d", misfire=misfire), t, now, grace=2.5)
        assert p.fires == want, misfire
        assert p.next_fire_at == t + timedelta(seconds=21)
        assert p.skipped == (misfire == "skip")
    capped = plan(Spec.every("m", 1, b"", "d", misfire="all"), t, now, grace=0, limit=7)
    assert capped.fires == secs(t, *range(7))
    assert capped.next_fire_at == t + timedelta(seconds=7)
