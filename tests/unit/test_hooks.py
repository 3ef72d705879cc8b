"""The middleware spine without a server: each hook reaches the middleware that
override it, ``before_*`` hooks in installation order and ``after_*`` ones (and
``on_stop``) in reverse, like nested context managers; a raising ``after_*`` hook is
logged and ignored, a raising ``before_*`` hook stops the step with a MiddlewareError
naming it."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from meepo import Middleware, MiddlewareError, Status
from meepo.ledger import Outcome
from meepo.middleware import Hooks
from meepo.records import NewJob


class Named(Middleware):
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def on_start(self, task: Any) -> None:
        self.calls.append(f"{self.name}.on_start")

    def on_stop(self, task: Any) -> None:
        self.calls.append(f"{self.name}.on_stop")

    def before_push(self, task: Any, jobs: Any) -> None:
        self.calls.append(f"{self.name}.before_push")

    def after_push(self, task: Any, jobs: Any, ids: Any) -> None:
        self.calls.append(f"{self.name}.after_push")

    def after_commit(self, task: Any, outcome: Outcome, accepted: bool) -> None:
        self.calls.append(f"{self.name}.after_commit")

    def after_retry(self, task: Any, outcome: Outcome) -> None:
        self.calls.append(f"{self.name}.after_retry")


class OnlyPush(Middleware):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def after_push(self, task: Any, jobs: Any, ids: Any) -> None:
        self.calls.append("only.after_push")


def test_no_middleware_builds_no_hooks() -> None:
    assert Hooks.build(object(), []) is None
    assert Hooks.build(object(), [Middleware()]) is not None


def test_before_hooks_run_in_order_and_after_hooks_in_reverse() -> None:
    calls: list[str] = []
    hooks = Hooks(object(), [Named("a", calls), OnlyPush(calls), Named("b", calls)])
    hooks.on_start()
    hooks.before_push([NewJob(b"x")])
    hooks.after_push([NewJob(b"x")], [1])
    hooks.on_stop()
    assert calls == [
        "a.on_start",
        "b.on_start",
        "a.before_push",
        "b.before_push",
        "b.after_push",
        "only.after_push",
        "a.after_push",
        "b.on_stop",
        "a.on_stop",
    ]


def test_after_retry_follows_an_accepted_todo_commit_only() -> None:
    calls: list[str] = []
    hooks = Hooks(object(), [Named("a", calls)])
    hooks.after_commit(Outcome(1, 1, Status.TODO), accepted=True)
    hooks.after_commit(Outcome(1, 1, Status.TODO), accepted=False)  # stale: no retry
    hooks.after_commit(Outcome(2, 1, Status.DONE), accepted=True)
    assert calls == ["a.after_commit", "a.after_retry", "a.after_commit", "a.after_commit"]


class Raising(Middleware):
    def before_push(self, task: Any, jobs: Any) -> None:
        raise RuntimeError("quota exceeded\nsecond line")

    def after_push(self, task: Any, jobs: Any, ids: Any) -> None:
        raise SystemExit(3)


def test_a_raising_after_hook_is_logged_and_the_next_middleware_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    hooks = Hooks(object(), [Named("a", calls), Raising()])
    with caplog.at_level(logging.ERROR, logger="meepo"):
        hooks.after_push([NewJob(b"x")], [1])  # Raising's runs first (reverse), then a's
    assert calls == ["a.after_push"]
    assert "middleware Raising.after_push raised; ignored" in caplog.text


def test_a_raising_before_hook_is_a_middleware_error_naming_it() -> None:
    calls: list[str] = []
    hooks = Hooks(object(), [Raising(), Named("a", calls)])
    with pytest.raises(MiddlewareError) as info:
        hooks.before_push([NewJob(b"x")])
    assert str(info.value) == (
        "middleware Raising.before_push raised RuntimeError: quota exceeded; nothing was pushed"
    )
    assert calls == []  # the step stopped at the first refusal
