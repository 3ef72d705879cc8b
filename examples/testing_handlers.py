"""Testing handlers with meepo's inline mode: no Redis, no redis-server, no workers.

The top half is "the app": two tasks built at import time as production code builds them
(a Redis URL, which nothing here connects to). The bottom half is its test module:
pytest functions using meepo's fixtures ``meepo_inline`` and ``meepo_ledger`` (the
plugin comes with meepo). Run it either way:

    pytest examples/testing_handlers.py      # as a test module
    python examples/testing_handlers.py      # the same tests, without pytest

As a script, the ledger is ``MEEPO_DB_URL`` if set, else a fresh SQLite file in a
temporary folder; Redis is never used. docs/testing.md explains the inline mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import meepo.testing
from meepo import Job, Middleware, Status, Task

# -- the app ------------------------------------------------------------------------------

REDIS_URL = os.environ.get("MEEPO_REDIS_URL", "redis://127.0.0.1:6379/0")
outbox: list[str] = []


def send_email(job: Job) -> None:
    """Auto-commit: returning is done, raising is a failed attempt (retried)."""
    address = job.payload.decode()
    if "@" not in address:
        raise ValueError(f"not an address: {address!r}")
    outbox.append(address)


def charge(job: Job) -> None:
    """Manual commit: the handler says how each job ends."""
    amount = int(job.payload)
    if amount <= 0:
        charges.commit(job.id, Status.FAILED, error=f"nothing to charge: {amount}")
    elif amount > 1000 and job.failed_times == 0:
        charges.commit(job.id, Status.TODO)  # ask again once (counts a failed attempt)
    else:
        charges.commit(job.id, Status.DONE)


emails = Task("example_emails", redis=REDIS_URL, job_func=send_email, max_failed_times=2)
charges = Task("example_charges", redis=REDIS_URL, job_func=charge, auto_commit=False)


# -- the tests ----------------------------------------------------------------------------


def test_a_good_address_is_sent(meepo_inline: Callable[..., Task]) -> None:
    task = meepo_inline(emails)
    job_id = task.push(b"ada@example.org")  # returns once the job is finished
    rec = task.get(job_id)
    assert rec is not None and rec.status is Status.DONE
    assert outbox[-1] == "ada@example.org"


def test_a_bad_address_fails_after_its_retries(meepo_inline: Callable[..., Task]) -> None:
    task = meepo_inline(emails)
    rec = task.get(task.push(b"nobody"))
    assert rec is not None
    assert (rec.status, rec.failed_times) == (Status.FAILED, 2)
    assert rec.last_error == "ValueError: not an address: 'nobody'"


def test_raise_errors_shows_the_handler_traceback(meepo_inline: Callable[..., Task]) -> None:
    task = meepo_inline(emails, raise_errors=True)
    try:
        task.push(b"nobody")
    except ValueError as exc:
        assert "not an address" in str(exc)
    else:
        raise AssertionError("push did not raise")


def test_manual_commits(meepo_inline: Callable[..., Task]) -> None:
    task = meepo_inline(charges)
    small, zero, big = task.push(b"10"), task.push(b"0"), task.push(b"5000")
    got = {i: task.get(i) for i in (small, zero, big)}
    assert all(r is not None for r in got.values())
    assert [(r.status, r.failed_times) for r in got.values() if r] == [
        (Status.DONE, 0),
        (Status.FAILED, 1),
        (Status.DONE, 1),
    ]


def test_middleware_sees_every_attempt(meepo_ledger: str) -> None:
    class Attempts(Middleware):
        seen: list[tuple[int, str]] = []

        def after_run(self, task: Any, job: Job, run: Any) -> None:
            self.seen.append((job.failed_times, "ok" if run.ok else "error"))

    task = Task("example_mw", db=meepo_ledger, job_func=send_email, inline=True,
                middleware=[Attempts()], max_failed_times=3)  # fmt: skip
    task.push(b"nobody")
    assert Attempts.seen == [(0, "error"), (1, "error"), (2, "error")]
    task.stop()


def test_a_delayed_job_runs_when_it_is_due(meepo_ledger: str) -> None:
    class Clock:
        offset = timedelta(0)

        def __call__(self) -> datetime:
            return datetime.now(timezone.utc) + self.offset

    clock = Clock()
    task = Task("example_later", db=meepo_ledger, job_func=send_email, inline=True, clock=clock)
    job_id = task.push(b"later@example.org", delay=3600)
    rec = task.get(job_id)
    assert rec is not None and rec.status is Status.TODO  # not due: waits for run_due
    assert meepo.testing.run_due(task) == []
    clock.offset = timedelta(hours=1, seconds=1)
    assert meepo.testing.run_due(task) == [job_id]
    rec = task.get(job_id)
    assert rec is not None and rec.status is Status.DONE


# -- without pytest: the same tests, with stand-ins for the two fixtures -------------------


def main() -> int:
    logging.getLogger("meepo").setLevel(logging.ERROR)  # the failed attempts are on purpose
    with tempfile.TemporaryDirectory() as tmp:
        from meepo.connect import engine_for
        from meepo.ledger import migrate

        ledger = os.environ.get("MEEPO_DB_URL") or f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}"
        migrate.upgrade(engine_for(ledger))

        @contextlib.contextmanager
        def inline_fixture() -> Iterator[Callable[..., Task]]:
            with contextlib.ExitStack() as stack:
                yield lambda task, **kw: stack.enter_context(
                    meepo.testing.inline(task, db=ledger, **kw)
                )

        tests = [(name, f) for name, f in globals().items() if name.startswith("test_")]
        for name, test in tests:
            if "meepo_inline" in test.__code__.co_varnames[: test.__code__.co_argcount]:
                with inline_fixture() as fixture:
                    test(fixture)
            else:
                test(ledger)
            print(f"  passed: {name}")
    print(f"testing_handlers: {len(tests)} tests passed, no Redis used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
