"""Cron and periodic schedules: validation and fire times. Pure: no I/O here.

A schedule is declared once per name (``Task.schedule_cron`` / ``Task.schedule_every``)
and fires at a sequence of instants:

* ``cron``: a 5-field cron expression (minute hour day-of-month month day-of-week), or
  6 fields where the **sixth (last) field is the second** - croniter's own convention,
  e.g. ``"*/2 * * * * 30"`` fires at second 30 of every other minute and
  ``"* * * * * */5"`` every 5 seconds. Aliases such as ``@hourly`` work. The
  expression is read in the schedule's IANA time zone ``tz`` (``"UTC"`` by default),
  so ``"0 9 * * *"`` with ``tz="Europe/Paris"`` fires at 09:00 Paris time all year.
* ``every``: a fixed interval, anchored on ``start`` when given, else on the Unix epoch
  (so ``every=3600`` fires on the hour, UTC, and every process computes the same fire
  times from the declaration alone).

``start`` (inclusive) and ``until`` (inclusive) bound the fire times; both must be aware
datetimes. After ``until`` the schedule is finished (``next_fire_at`` is None).

Misfires. A fire is *on time* when a scheduler handles it at most ``grace`` seconds
after its fire time (``DEFAULT_MISFIRE_GRACE``, 5 s, by default), and *missed*
otherwise - which happens only when no scheduler ran (every worker was down or busy
past the grace). On-time fires always get one job each. Missed fires follow the
schedule's ``misfire`` policy:

* ``"one"`` (default): one job for all of them, due at the latest missed fire time;
* ``"all"``: one job per missed fire (at most ``limit`` per scheduler pass; the next pass
  continues where this one stopped);
* ``"skip"``: no job; the schedule resumes with the next on-time or future fire.

Every job's ``run_at`` is the fire time it stands for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from croniter import croniter as Croniter

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KINDS = ("cron", "every")
MISFIRES = ("one", "all", "skip")
DEFAULT_MISFIRE = "one"
#: How late a fire may be handled and still count as on time (seconds).
DEFAULT_MISFIRE_GRACE = 5.0
#: Most jobs one schedule makes in one scheduler pass (``misfire="all"`` catch-up).
MAX_FIRES_PER_PASS = 100
#: Schedule names: a static id chosen by the application.
NAME_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
MAX_EXPR_LENGTH = 255
_US = timedelta(microseconds=1)


def _croniter(expr: str, start: datetime) -> Croniter:
    """croniter, imported when a cron expression is first read: a worker without cron
    schedules never loads it (start-up time)."""
    from croniter import croniter

    return croniter(expr, start)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid schedule name {name!r}: use 1 to 128 characters from A-Z a-z 0-9 _ . : -"
        )
    return name


def check_misfire(misfire: object) -> str:
    if misfire not in MISFIRES:
        raise ValueError(f"unknown misfire policy {misfire!r}: expected one of one, all, skip")
    return str(misfire)


def zone(tz: object) -> tzinfo:
    """The IANA time zone named ``tz``; ValueError naming it if there is none."""
    if not isinstance(tz, str) or not tz or len(tz) > 64:
        raise ValueError(f"unknown time zone {tz!r}: expected an IANA name such as 'UTC'")
    if tz.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {tz!r}: expected an IANA name such as 'Europe/Paris'"
        ) from None


def check_cron(expr: object, tz: str = "UTC") -> str:
    """A 5- or 6-field (seconds last) cron expression; ValueError naming it otherwise."""
    if not isinstance(expr, str) or not expr.strip() or len(expr) > MAX_EXPR_LENGTH:
        raise ValueError(f"invalid cron expression {expr!r}: expected a non-empty string")
    text = " ".join(expr.split())
    fields = len(text.split(" "))
    if not text.startswith("@") and fields not in (5, 6):
        raise ValueError(
            f"invalid cron expression {expr!r}: expected 5 fields (minute hour day month "
            f"weekday) or 6 (the sixth is the second), not {fields}"
        )
    try:
        _croniter(text, datetime(2000, 1, 1, tzinfo=zone(tz))).get_next(datetime)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None
    return text


def interval_us(every: object) -> int:
    """An ``every`` interval (seconds or timedelta, > 0) in whole microseconds."""
    if isinstance(every, timedelta):
        secs = every.total_seconds()
    elif isinstance(every, (int, float)) and not isinstance(every, bool):
        secs = float(every)
    else:
        raise ValueError(f"every must be seconds (a number) or a timedelta, not {every!r}")
    if not math.isfinite(secs) or secs <= 0:
        raise ValueError(f"every must be a positive number of seconds, not {every!r}")
    us = round(secs * 1_000_000)
    if us < 1:
        raise ValueError(f"every must be at least one microsecond, not {every!r}")
    return us


def format_interval(us: int) -> str:
    """Seconds as stored in the ``expr`` column: ``"2"``, ``"0.5"``."""
    whole, frac = divmod(us, 1_000_000)
    return str(whole) if not frac else f"{whole}.{frac:06d}".rstrip("0")


def parse_interval(text: str) -> int:
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(frac) > 6:
        raise ValueError(f"invalid stored interval {text!r}")
    us = int(whole) * 1_000_000 + (int(frac.ljust(6, "0")) if frac else 0)
    if us < 1:
        raise ValueError(f"invalid stored interval {text!r}")
    return us


def aware(value: object, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be an aware datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{name} must be an aware datetime (e.g. with tzinfo=timezone.utc), not the "
            f"naive {value.isoformat()}"
        )
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Spec:
    """A validated schedule declaration (what one row of the schedules table holds,
    apart from its fire bookkeeping)."""

    name: str
    kind: str
    expr: str
    tz: str
    payload: bytes
    priority: str
    start_at: datetime | None
    until_at: datetime | None
    misfire: str

    @classmethod
    def cron(
        cls,
        name: object,
        expr: object,
        payload: bytes,
        priority: str,
        *,
        start: object = None,
        until: object = None,
        tz: object = "UTC",
        misfire: object = DEFAULT_MISFIRE,
    ) -> Spec:
        zone(tz)
        assert isinstance(tz, str)
        return cls._make(
            name, "cron", check_cron(expr, tz), tz, payload, priority, start, until, misfire
        )

    @classmethod
    def every(
        cls,
        name: object,
        every: object,
        payload: bytes,
        priority: str,
        *,
        start: object = None,
        until: object = None,
        misfire: object = DEFAULT_MISFIRE,
    ) -> Spec:
        expr = format_interval(interval_us(every))
        return cls._make(name, "every", expr, "UTC", payload, priority, start, until, misfire)

    @classmethod
    def _make(
        cls,
        name: object,
        kind: str,
        expr: str,
        tz: str,
        payload: bytes,
        priority: str,
        start: object,
        until: object,
        misfire: object,
    ) -> Spec:
        start_at = aware(start, "start")
        until_at = aware(until, "until")
        if start_at is not None and until_at is not None and until_at < start_at:
            raise ValueError(
                f"until ({until_at.isoformat()}) is before start ({start_at.isoformat()})"
            )
        return cls(
            check_name(name),
            kind,
            expr,
            tz,
            payload,
            priority,
            start_at,
            until_at,
            check_misfire(misfire),
        )

    def check(self) -> Spec:
        """Re-validate a spec read back from the database (a row edited by hand)."""
        if self.kind == "cron":
            check_cron(self.expr, self.tz)
        elif self.kind == "every":
            parse_interval(self.expr)
        else:
            raise ValueError(f"unknown schedule kind {self.kind!r}: expected cron or every")
        check_misfire(self.misfire)
        return self

    # -- timing -----------------------------------------------------------------------

    def same_timing(self, other: Spec) -> bool:
        """Whether both fire at the same instants (payload, priority, misfire aside)."""
        return (self.kind, self.expr, self.tz, self.start_at, self.until_at) == (
            other.kind,
            other.expr,
            other.tz,
            other.start_at,
            other.until_at,
        )

    def _after(self, t: datetime) -> datetime:
        """The first fire strictly after ``t``, ignoring ``until``."""
        if self.start_at is not None and t < self.start_at:
            t = self.start_at - _US  # so that ``start`` itself may fire
        if self.kind == "every":
            step = parse_interval(self.expr)
            anchor = self.start_at or EPOCH
            k = (t - anchor) // _US // step + 1
            return anchor + timedelta(microseconds=k * step)
        it = _croniter(self.expr, t.astimezone(zone(self.tz)))
        nxt: datetime = it.get_next(datetime)
        return nxt.astimezone(UTC)

    def next_after(self, t: datetime) -> datetime | None:
        """The first fire strictly after ``t``; None when it would be after ``until``."""
        nxt = self._after(t)
        if self.until_at is not None and nxt > self.until_at:
            return None
        return nxt

    def first_at_or_after(self, t: datetime) -> datetime | None:
        return self.next_after(t - _US)

    def fires(self, after: datetime) -> Iterator[datetime]:
        """The fire times strictly after ``after``, in order, up to ``until``."""
        t: datetime | None = after
        while t is not None:
            t = self.next_after(t)
            if t is not None:
                yield t

    def last_before(self, t: datetime, not_before: datetime) -> datetime | None:
        """The latest fire in ``[not_before, t)`` (and within start/until), or None."""
        if self.until_at is not None:
            t = min(t, self.until_at + _US)
        if self.kind == "every":
            step = parse_interval(self.expr)
            anchor = self.start_at or EPOCH
            k = ((t - _US) - anchor) // _US // step
            last = anchor + timedelta(microseconds=k * step)
        else:
            it = _croniter(self.expr, t.astimezone(zone(self.tz)))
            last = it.get_prev(datetime).astimezone(UTC)  # strictly before t
        if last < not_before or (self.start_at is not None and last < self.start_at):
            return None
        return last


@dataclass(frozen=True)
class Plan:
    """What one scheduler pass does for one due schedule: a job per ``fires`` entry (its
    due time) and the schedule's new ``next_fire_at`` (None: finished)."""

    fires: list[datetime]
    next_fire_at: datetime | None
    skipped: bool = False  # missed fires were dropped (misfire="skip")


def plan(
    spec: Spec,
    next_fire_at: datetime,
    now: datetime,
    grace: float = DEFAULT_MISFIRE_GRACE,
    limit: int = MAX_FIRES_PER_PASS,
) -> Plan:
    """The jobs due for a schedule whose next fire is ``next_fire_at`` (<= ``now``).

    Fires before ``now - grace`` are missed and follow ``spec.misfire``; later ones are
    on time and get a job each. At most ``limit`` jobs; when the limit stops the pass,
    ``next_fire_at`` is the first fire not handled (still due: the caller goes again).
    """
    if next_fire_at > now:
        return Plan([], next_fire_at)
    cutoff = now - timedelta(seconds=grace)
    fires: list[datetime] = []
    skipped = False
    cursor = next_fire_at
    if next_fire_at < cutoff:  # some fires were missed: those in [next_fire_at, cutoff)
        if spec.misfire == "all":
            t: datetime | None = next_fire_at
            while t is not None and t < cutoff and len(fires) < limit:
                fires.append(t)
                t = spec.next_after(t)
            if t is None or len(fires) >= limit:
                return Plan(fires, t)
            cursor = t
        else:
            last = spec.last_before(cutoff, next_fire_at)
            if last is None:  # cannot happen: next_fire_at itself is one
                last = next_fire_at
            if spec.misfire == "one":
                fires.append(last)
            else:
                skipped = True
            cursor_or_none = spec.next_after(last)
            if cursor_or_none is None:
                return Plan(fires, None, skipped)
            cursor = cursor_or_none
    # on-time fires: [cursor, now]
    nxt: datetime | None = cursor
    while nxt is not None and nxt <= now and len(fires) < limit:
        fires.append(nxt)
        nxt = spec.next_after(nxt)
    return Plan(fires, nxt, skipped)
