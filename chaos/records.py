"""The harness's append-only logs: one JSON object per line, one file per process.

Files rather than a table: a record written with one ``write(2)`` on an ``O_APPEND``
descriptor is in the kernel when the call returns, so it survives the process being
SIGKILLed right after, and writing it does not depend on the database the faults take
down (a handler that could not log would fail its job and bend the figures).

Files in a run directory:

* ``exec-<pid>.jsonl`` (workers): ``{"e": "start"|"end", "task": "auto"|"manual",
  "job": id, "cid": commit_id, "att": attempt, "pid": pid, "ts": wall time, "out": …}``;
  ``out`` on an end record is ``ok`` / ``raise`` (auto task) or the manual commit the
  handler is about to make: ``done`` / ``failed`` / ``todo`` / ``none``; a handler whose
  manual commit was refused as stale adds ``{"e": "stale", …}``.
* ``ack-<producer>.jsonl`` (producers): ``{"e": "boot", …}`` once per process start,
  ``{"e": "ack", "task": …, "ids": […], "kinds": […]}`` for ids a push returned, and
  ``{"e": "torn", "task": …, "ids": […], "ts": …}`` written just before a producer kills
  itself between its INSERT and its RPUSH.
* ``harness.jsonl`` (the harness): processes started and ended, faults injected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class AppendLog:
    """Lines appended with one ``os.write`` each (no user-space buffer to lose)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **record: Any) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        os.write(self.fd, line.encode())

    def close(self) -> None:
        os.close(self.fd)


def read(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of a log (a line cut short by a kill is skipped)."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                continue
            try:
                yield json.loads(raw)
            except ValueError:
                continue


def read_all(directory: Path, pattern: str) -> Iterator[dict[str, Any]]:
    for path in sorted(directory.glob(pattern)):
        yield from read(path)
