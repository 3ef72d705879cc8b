"""Tables, ages and the repush progress bar of the ``meepo`` commands."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

#: Repushes larger than this draw a progress bar (when stderr is a terminal).
PROGRESS_THRESHOLD = 1000


class ProgressBar:
    """A ``progress(done, total)`` callback drawing click's progress bar on a terminal.

    Drawn only when the stream is a terminal and the set is larger than ``threshold``,
    so piped and captured output stays plain."""

    def __init__(self, stream: TextIO, label: str, threshold: int = PROGRESS_THRESHOLD) -> None:
        self.stream = stream
        self.label = label
        self.threshold = threshold
        self.enabled = stream.isatty()
        self.shown = False
        self._bar: Any = None
        self._done = 0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled or max(done, total or 0) <= self.threshold:
            return
        if self._bar is None:
            import click

            self._bar = click.progressbar(
                length=total, label=self.label, file=self.stream, show_pos=True
            )
            self._bar.__enter__()
            self.shown = True
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def when(d: datetime | None) -> str:
    return "-" if d is None else d.isoformat(sep=" ", timespec="seconds")
