"""The cleaner: removes a task's finished jobs once they are past its retention.

``Task(..., retention={"done": "7d", "failed": "30d"})`` keeps done jobs seven days and
failed ones thirty after they finished (their last change, ``updated_at``); a status
left out is kept for ever, as is every job of a task without ``retention=``. The
policy is stored per task in ``<table>_retention`` when the worker starts, so every
worker and the CLI read the same one: the cleaner reads it back each pass, and the last
worker started wins.

It runs beside the reaper in every worker process, and any number of cleaners may race:
each chunk (at most 1,000 rows, one short transaction, see
:mod:`meepo.ledger.retention`) locks its rows with SKIP LOCKED, so two cleaners take
different rows and neither waits on the other; on SQLite the writer lock serialises
them, and a row already deleted is simply not found. A job still holding a unique key
(``unique_for``) is kept until its hold is over. Times are the database's (docs/design.md
invariant 8). A pass stops after :data:`PASS_CHUNKS` chunks and the rest waits for the
next pass, :data:`PAUSE` later, so one cleaner never keeps the database busy for long.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ..errors import ConfigError
from ..ledger.retention import CHUNK, Retention
from ..records import Status
from .service import Service

log = logging.getLogger("meepo.cleaner")

#: Seconds between two passes of a worker's cleaner.
CLEAN_INTERVAL = 60.0
#: Chunks a pass removes at most (each at most CHUNK rows); the rest waits a tick.
PASS_CHUNKS = 50
#: Seconds between two passes while a backlog is left (the database breathes).
PAUSE = 0.5

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any, name: str) -> float:
    """Seconds from a number, a timedelta, ``"3600"``, or ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``,
    ``"2w"``; anything else (zero, negative, an unknown unit) is a ConfigError (a
    ValueError) naming ``name`` and the value."""
    if isinstance(value, timedelta):
        secs = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        secs = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip().lower())
        if m is None:
            raise ConfigError(
                f"{name}: invalid duration {value!r}: use seconds, a timedelta, or a number "
                "with a unit s, m, h, d or w (90s, 30m, 12h, 7d, 2w)"
            )
        secs = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(
            f"{name}: a duration is seconds, a timedelta or a string such as '7d', "
            f"not {type(value).__name__}"
        )
    if not secs > 0 or secs == float("inf"):
        raise ConfigError(f"{name}: the duration must be positive, not {value!r}")
    return secs


def check_retention(value: Any) -> dict[Status, float] | None:
    """``Task(retention=)``: None (keep what is stored), or a mapping from ``"done"`` /
    ``"failed"`` to a duration (see :func:`parse_duration`); ``{}`` clears the task's
    stored retention (keep every job)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            "retention must be a mapping such as {'done': '7d', 'failed': '30d'}, "
            f"not {type(value).__name__}"
        )
    out: dict[Status, float] = {}
    for key, duration in value.items():
        try:
            status = Status.parse(key)
        except ValueError:
            status = None
        if status is None or not status.terminal:
            raise ConfigError(
                f"retention: {key!r} is not a finished status: use 'done', 'failed' or 'cancelled'"
            )
        out[status] = parse_duration(duration, f"retention[{status.value!r}]")
    return out


@dataclass
class CleanReport:
    #: Rows removed per status.
    removed: dict[Status, int] = field(default_factory=dict)
    #: Rows kept because they still hold a unique key.
    held: int = 0
    #: Whether the pass stopped at PASS_CHUNKS with rows left.
    more: bool = False

    @property
    def total(self) -> int:
        return sum(self.removed.values())


class Cleaner(Service):
    kind = "cleaner"

    def __init__(
        self,
        retention: Retention,
        task_id: str,
        policy: dict[Status, float] | None,
        *,
        interval: float = CLEAN_INTERVAL,
        max_chunks: int = PASS_CHUNKS,
    ) -> None:
        super().__init__(task_id, log, min(interval, 1.0))
        self.store = retention
        self.policy = policy
        self.interval = interval
        self.max_chunks = max_chunks
        self._saved = policy is None

    def save(self) -> None:
        """Store this task's ``retention=`` in the ledger (once; retried until it works)."""
        if not self._saved and self.policy is not None:
            self.store.save_policy(self.task_id, self.policy)
            self._saved = True
            log.info(
                "task %s: retention %s",
                self.task_id,
                ", ".join(f"{s.value} {v:g}s" for s, v in sorted(self.policy.items()))
                or "none (jobs are kept)",
            )

    def run_once(self) -> CleanReport:
        """One pass: the stored policy, then up to ``max_chunks`` chunks per status."""
        self.save()
        report = CleanReport()
        policy = self.store.policy(self.task_id)
        if not policy:
            return report
        now = self.store.db_now()
        for status, keep in sorted(policy.items()):
            cutoff = now - timedelta(seconds=keep)
            cursor = None
            for _ in range(self.max_chunks):
                chunk = self.store.purge_chunk(self.task_id, status, cutoff, after=cursor)
                report.removed[status] = report.removed.get(status, 0) + chunk.removed
                report.held += chunk.held
                cursor = chunk.cursor
                if cursor is None:
                    break
            else:
                report.more = True
        if report.total:
            log.info(
                "task %s: cleaner removed %s",
                self.task_id,
                ", ".join(f"{n} {s.value}" for s, n in sorted(report.removed.items()) if n),
            )
        return report

    def tick(self) -> float:
        report = self.run_once()
        return min(self.interval, PAUSE) if report.more else self.interval


__all__ = ["CHUNK", "CleanReport", "Cleaner", "check_retention", "parse_duration"]
