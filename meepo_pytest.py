"""meepo's pytest plugin: fixtures to test handlers inline (docs/testing.md).

Installed with meepo (the ``pytest11`` entry point ``meepo``), so every test session
of a project that has meepo installed loads it: it imports only pytest here, and meepo
inside the fixtures, when a test uses one. ``-p no:meepo`` turns it off.

* ``meepo_ledger``: the URL of a fresh, migrated SQLite ledger in the test's
  ``tmp_path`` (one per test).
* ``meepo_inline``: ``meepo_inline(task, raise_errors=False)`` runs ``task`` inline
  (:func:`meepo.testing.inline`) on the test's ``meepo_ledger`` until the test ends, and
  returns it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["meepo_inline", "meepo_ledger"]


@pytest.fixture
def meepo_ledger(tmp_path: Path) -> Iterator[str]:
    """A fresh SQLite ledger for this test, migrated: its URL (``sqlite:///...``)."""
    from meepo.connect import engine_for
    from meepo.ledger import migrate

    url = f"sqlite:///{tmp_path / 'meepo-ledger.sqlite3'}"
    engine = engine_for(url)
    migrate.upgrade(engine)
    yield url
    engine.dispose()  # no file stays open once the test is over


@pytest.fixture
def meepo_inline(meepo_ledger: str) -> Iterator[Callable[..., Any]]:
    """``meepo_inline(task, raise_errors=False)``: ``task`` runs inline on this test's
    ``meepo_ledger`` until the test ends (then it is as it was); returns the task."""
    from meepo.testing import inline

    with contextlib.ExitStack() as stack:

        def enter(task: Any, *, raise_errors: bool = False) -> Any:
            return stack.enter_context(inline(task, raise_errors=raise_errors, db=meepo_ledger))

        yield enter
