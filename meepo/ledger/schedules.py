"""The schedules table (``<table>_schedules``): the rules of declarations and fires.
Every statement is the ledger driver's (:mod:`meepo.ledger.driver`: ``insert_schedule``,
``redeclare_schedule``, ``delete_schedule``, ``get_schedule``, ``list_schedules``,
``due_schedules``, ``next_schedule_due``, ``fire_schedule``); this module decides what
they check and write.

* :meth:`Schedules.declare` - insert or update a declaration. Declaring the same
  settings again writes nothing (``next_fire_at`` is kept); changed timing (kind,
  expression, tz, start, until) recomputes ``next_fire_at`` at once; a changed payload,
  priority or misfire policy keeps it. Concurrent first declarations race on the
  primary key ``(task_id, name)``: the loser reads the winner's row and carries on.
* :meth:`Schedules.due` / :meth:`Schedules.next_due` - the schedulers' scan
  (``next_fire_at <= now`` and ``MIN(next_fire_at)``, on the ``(task_id, next_fire_at)``
  index).
* :meth:`Schedules.advance` - the compare-and-set that makes each fire time produce
  exactly one job: ``UPDATE … SET next_fire_at = new WHERE task_id, name AND
  next_fire_at = old AND updated_at = old``, run in the same transaction as the job
  INSERT. Of all the schedulers that read the same row, only the one whose UPDATE
  matched inserts; the others' UPDATE matches nothing (row locks make them wait for the
  winner's commit, then re-check the WHERE clause against the committed row).
* :meth:`Schedules.remove`, :meth:`Schedules.get`, :meth:`Schedules.all`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Table

from ..records import ScheduleRecord
from ..schedule import Spec
from .drivers import driver_for
from .engine import translate_errors
from .schema import schedules_table

_US = timedelta(microseconds=1)


def spec_of(rec: ScheduleRecord) -> Spec:
    """The declaration a row holds (not re-validated; see ``Spec.check``)."""
    return Spec(
        rec.name,
        rec.kind,
        rec.expr,
        rec.tz,
        rec.payload,
        rec.priority,
        rec.start_at,
        rec.until_at,
        rec.misfire,
    )


def next_fires(rec: ScheduleRecord, n: int) -> list[datetime]:
    """The next ``n`` fire times of a schedule row, from its ``next_fire_at``."""
    if rec.next_fire_at is None:
        return []
    out = [rec.next_fire_at]
    for t in spec_of(rec).fires(rec.next_fire_at):
        if len(out) >= n:
            break
        out.append(t)
    return out[:n]


class Schedules:
    """The schedules table of one ledger."""

    def __init__(self, engine: Engine, table_name: str) -> None:
        self.engine = engine
        self.table: Table = schedules_table(table_name)
        self.table_name = table_name
        self.url = engine.url.render_as_string(hide_password=True)
        #: Every statement on the schedules table is the ledger driver's.
        self.driver = driver_for(engine, table_name)

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        with translate_errors(self.url, self.table.name), self.engine.begin() as conn:
            yield conn

    # -- declarations -----------------------------------------------------------------

    def declare(self, task_id: str, spec: Spec, now: datetime) -> tuple[ScheduleRecord, bool]:
        """Insert or update the schedule ``spec.name``; returns its row and whether this
        call wrote anything."""
        for _ in range(10):
            found = self.get(task_id, spec.name)
            if found is None:
                if self._insert(task_id, spec, now):
                    rec = self.get(task_id, spec.name)
                    if rec is not None:
                        return rec, True
                continue  # another process inserted it first (or removed it): re-read
            old = spec_of(found)
            if old == spec:
                return found, False
            if self._update(task_id, found, spec, now):
                rec = self.get(task_id, spec.name)
                if rec is not None:
                    return rec, True
            # changed meanwhile (a scheduler fired, another process declared): re-read
        raise RuntimeError(f"schedule {spec.name!r} kept changing while being declared")

    def _insert(self, task_id: str, spec: Spec, now: datetime) -> bool:
        return self.driver.insert_schedule(
            {
                "task_id": task_id,
                **_settings(spec),
                "next_fire_at": spec.first_at_or_after(now),
                "last_fire_at": None,
                "created_at": now,
                "updated_at": now,
            }
        )

    def _update(self, task_id: str, found: ScheduleRecord, spec: Spec, now: datetime) -> bool:
        values: dict[str, Any] = {**_settings(spec), "updated_at": max(now, found.updated_at + _US)}
        if not spec_of(found).same_timing(spec):
            # The new timing starts now, and never re-fires a time already fired.
            after = now
            if found.last_fire_at is not None and found.last_fire_at >= now:
                after = found.last_fire_at + _US
            values["next_fire_at"] = spec.first_at_or_after(after)
        return self.driver.redeclare_schedule(task_id, found.name, found.updated_at, values)

    def remove(self, task_id: str, name: str) -> bool:
        return self.driver.delete_schedule(task_id, name)

    # -- reads ------------------------------------------------------------------------

    def get(self, task_id: str, name: str) -> ScheduleRecord | None:
        return self.driver.get_schedule(task_id, name)

    def all(self, task_id: str | None = None) -> list[ScheduleRecord]:
        """Every schedule of the table (or of one task), by task and name."""
        return self.driver.list_schedules(task_id)

    def due(self, task_id: str, now: datetime, limit: int = 100) -> list[ScheduleRecord]:
        """Schedules of ``task_id`` whose next fire is at or before ``now``, earliest
        first."""
        return self.driver.due_schedules(task_id, now, limit)

    def next_due(self, task_id: str) -> datetime | None:
        """The earliest ``next_fire_at`` of the task's schedules (None: nothing left)."""
        return self.driver.next_schedule_due(task_id)

    # -- firing -----------------------------------------------------------------------

    def advance(
        self,
        conn: Connection,
        rec: ScheduleRecord,
        new_next: datetime | None,
        last_fire: datetime | None,
        now: datetime,
    ) -> bool:
        """Move ``rec``'s ``next_fire_at`` on, if nobody moved or redeclared it since
        ``rec`` was read; in the caller's transaction (the one inserting the jobs)."""
        values: dict[str, Any] = {
            "next_fire_at": new_next,
            "updated_at": max(now, rec.updated_at + _US),
        }
        if last_fire is not None:
            values["last_fire_at"] = last_fire
        return self.driver.fire_schedule(conn, rec, values)


def _settings(spec: Spec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "kind": spec.kind,
        "expr": spec.expr,
        "tz": spec.tz,
        "payload": spec.payload,
        "priority": spec.priority,
        "start_at": spec.start_at,
        "until_at": spec.until_at,
        "misfire": spec.misfire,
    }
