"""A chaos producer process: pushes its share of the workload at a steady pace and logs
every id a push returned (the acknowledged set) to ``ack-<index>.jsonl``.

Pushes are a seeded mix of ``push``, ``push_many``, and ``push_many`` inside the
caller's transaction (a SQLAlchemy ``Connection``, or an ORM ``Session``), a tenth of
which are rolled back on purpose (their ids are not acknowledged). A fifth of the plain
pushes are delayed (up to 3 s, or 4-12 s) and a third carry a ``high`` or ``low``
priority. About a tenth of the jobs go to the manual-commit task. Each acknowledgement
carries ``nb``: the earliest time its jobs may start (the wall time before the push,
plus its delay), for the "no start before run_at" check.

Extras: a few plain pushes carry a unique ``key`` (a push while the holder is unfinished
returns the holder's id); batches of 8-16 ``z`` jobs go to one of the zombie tasks (to
fill their large prefetch); some ORM-Session batches push in a savepoint that is rolled
back (``begin_nested``) while the outer push commits (its ids are acknowledged and must
be dispatched at once, not at the sweep deadline); and a few batches carry payloads near
``max_payload_bytes`` (a push that fails is logged as ``push_error`` and not retried).

SIGUSR1 arms a torn push: the next dispatch after a committed INSERT logs the ids it was
about to send and SIGKILLs this process before the RPUSH (the harness restarts it). A
restarted producer reads its log, skips what was acknowledged and goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from meepo import Task
from meepo.errors import MeepoError
from meepo.records import Message

from .records import AppendLog, read

AUTO_KINDS = (
    ("normal", 0.954),
    ("flaky", 0.03),
    ("poison", 0.01),
    ("slow", 0.004),
    ("fork", 0.002),
)
MANUAL_KINDS = (
    ("m-done", 0.7),
    ("m-slow", 0.1),
    ("m-fail", 0.07),
    ("m-retry", 0.08),
    ("m-none", 0.05),
)
#: A payload this many bytes below max_payload_bytes (1 MiB): the JSON head fits.
LARGE = 1024 * 1024 - 256


class RolledBack(Exception):
    """Raised inside a transaction to roll it back on purpose."""


def pick(rng: random.Random, table: Sequence[tuple[str, float]]) -> str:
    x = rng.random()
    for kind, weight in table:
        x -= weight
        if x < 0:
            return kind
    return table[-1][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--db", required=True)
    p.add_argument("--redis", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--auto-task", required=True)
    p.add_argument("--manual-task", required=True)
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--quota", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--t0", type=float, required=True, help="wall time the workload began")
    p.add_argument("--spread", type=float, required=True, help="seconds to spread pushes over")
    p.add_argument("--zombie-timeout", type=float, default=10.0)
    p.add_argument("--manual-fraction", type=float, default=0.1)
    p.add_argument("--zombie-tasks", default="", help="z-todo,z-done,z-failed task ids")
    args = p.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s producer{args.index}[{os.getpid()}] %(levelname)s %(name)s: "
        "%(message)s",
    )
    path = args.log_dir / f"ack-{args.index}.jsonl"
    acked = boots = 0
    if path.exists():
        for rec in read(path):
            if rec["e"] == "ack":
                acked += len(rec["ids"])
            elif rec["e"] == "boot":
                boots += 1
    out = AppendLog(path)
    out.write(e="boot", pid=os.getpid(), ts=time.time(), acked=acked)
    rng = random.Random(f"{args.seed}:producer:{args.index}:{boots}")

    common = {"db": args.db, "redis": args.redis, "table_name": args.table}
    tasks = {
        "auto": Task(args.auto_task, zombie_timeout=args.zombie_timeout, **common),
        "manual": Task(args.manual_task, zombie_timeout=args.zombie_timeout, **common),
    }
    znames = [f"z-{s}" for s in ("todo", "done", "failed")]
    for name, task_id in zip(znames, [t for t in args.zombie_tasks.split(",") if t], strict=False):
        tasks[name] = Task(task_id, zombie_timeout=args.zombie_timeout, **common)
    zombie = [n for n in znames if n in tasks]
    engine = tasks["auto"].engine

    armed = {"torn": False}

    def arm(_signum: int, _frame: FrameType | None) -> None:
        armed["torn"] = True

    signal.signal(signal.SIGUSR1, arm)
    for name, task in tasks.items():
        task.dispatcher.send = tear(task.dispatcher.send, name, out, armed)  # type: ignore[method-assign,assignment]

    seq = 0
    while acked < args.quota:
        due = args.quota * (time.time() - args.t0) / args.spread
        if acked >= due:
            pause(min(0.05, (acked - due + 1) * args.spread / args.quota))
            continue
        left = args.quota - acked
        r = rng.random()
        if zombie and r < 0.04:  # a burst for one zombie task's prefetch
            name = rng.choice(zombie)
            ps = [_payload("z", args, boots, seq + i) for i in range(min(left, rng.randint(8, 16)))]
            seq += len(ps)
            t = time.time()
            try:
                ids = tasks[name].push_many(ps)
            except (MeepoError, SQLAlchemyError) as exc:
                logging.getLogger("chaos").warning("push failed (%s); retrying", exc)
                pause(0.2)
                continue
            out.write(e="ack", task=name, ids=ids, ts=time.time(), nb=t)
            acked += len(ids)
            continue
        if r < 0.045:  # large payloads near max_payload_bytes, in one push_many
            n = min(left, rng.randint(2, 20))
            ps = [_payload("normal", args, boots, seq + i, pad=LARGE) for i in range(n)]
            seq += n
            t = time.time()
            try:
                ids = _persist(lambda ps=ps: tasks["auto"].push_many(ps))
            except (MeepoError, SQLAlchemyError) as exc:
                out.write(
                    e="push_error",
                    what=f"{n} payloads of 1 MiB",
                    error=str(exc)[:300],
                    ts=time.time(),
                )
                acked += n  # counted as pushed: not retried
                continue
            out.write(e="ack", task="auto", ids=ids, ts=time.time(), nb=t)
            acked += len(ids)
            continue
        if r < 0.06:  # a unique key (the holder's id comes back while it is unfinished)
            key = f"u{args.index}-{rng.randrange(40)}"
            seq += 1
            t = time.time()
            try:
                ids = [tasks["auto"].push(_payload("normal", args, boots, seq), key=key)]
            except (MeepoError, SQLAlchemyError) as exc:
                logging.getLogger("chaos").warning("push failed (%s); retrying", exc)
                pause(0.2)
                continue
            out.write(e="ack", task="auto", ids=ids, ts=time.time(), nb=t, key=key)
            acked += 1
            continue
        n = 1 if rng.random() < 0.35 else rng.randint(2, 40)
        n = min(n, left)
        batch: dict[str, list[bytes]] = {"auto": [], "manual": []}
        for _ in range(n):
            seq += 1
            name = "manual" if rng.random() < args.manual_fraction else "auto"
            kind = pick(rng, MANUAL_KINDS if name == "manual" else AUTO_KINDS)
            batch[name].append(_payload(kind, args, boots, seq))
        mode = rng.random()
        rollback = rng.random() < 0.1
        nested = rng.random() < 0.3
        t = time.time()
        try:
            got: dict[str, list[int]] = {}
            if mode < 0.6:
                delay = None
                if rng.random() < 0.2:
                    delay = rng.uniform(0.0, 3.0) if rng.random() < 0.5 else rng.uniform(4, 12)
                priority = rng.choice(["high", "default", "default", "default", "low"])
                for name, ps in batch.items():
                    if ps:  # acknowledged one push at a time: a later failure keeps these
                        t = time.time()
                        ids = _plain(tasks[name], ps, delay, priority)
                        out.write(e="ack", task=name, ids=ids, ts=time.time(), nb=t + (delay or 0))
                        acked += len(ids)
            elif mode < 0.8:
                with engine.begin() as conn:
                    for name, ps in batch.items():
                        if ps:
                            got[name] = tasks[name].push_many(ps, connection=conn)
                    if rollback:
                        raise RolledBack
            else:
                with Session(engine) as session, session.begin():
                    for name, ps in batch.items():
                        if ps:
                            got[name] = tasks[name].push_many(ps, connection=session)
                    if nested:  # a savepoint rolled back: its jobs vanish, the rest stay
                        extra = [_payload("normal", args, boots, seq + 1)]
                        seq += 1
                        savepoint = session.begin_nested()
                        tasks["auto"].push_many(extra, connection=session)
                        savepoint.rollback()
                    if rollback:
                        raise RolledBack
        except RolledBack:
            continue
        except (MeepoError, SQLAlchemyError) as exc:
            logging.getLogger("chaos").warning("push failed (%s); retrying", exc)
            pause(0.2)
            continue
        for name, ids in got.items():
            out.write(
                e="ack",
                task=name,
                ids=ids,
                ts=time.time(),
                nb=t,
                savepoint=bool(nested and mode >= 0.8),
            )
            acked += len(ids)
    out.write(e="finished", pid=os.getpid(), ts=time.time(), acked=acked)
    out.close()
    return 0


def pause(seconds: float) -> None:
    threading.Event().wait(seconds)


def _persist(push: Callable[[], list[int]], tries: int = 12) -> list[int]:
    """``push()``, tried again for about 12 s: an error that outlasts a database
    restart is the push's own (a server limit), not an outage."""
    for _ in range(tries - 1):
        try:
            return push()
        except (MeepoError, SQLAlchemyError):
            pause(1.0)
    return push()


def _payload(kind: str, args: argparse.Namespace, boots: int, seq: int, pad: int = 0) -> bytes:
    head = json.dumps({"k": kind, "p": args.index, "b": boots, "n": seq}).encode()
    if pad:
        return head[:-1] + b', "x": "' + b"x" * (pad - len(head) - 8) + b'"}'
    return head


def _plain(task: Task, payloads: list[bytes], delay: float | None, priority: str) -> list[int]:
    if len(payloads) == 1:
        return [task.push(payloads[0], delay=delay, priority=priority)]
    return task.push_many(payloads, delay=delay, priority=priority)


def tear(
    send: Callable[[Sequence[Message]], bool],
    name: str,
    out: AppendLog,
    armed: dict[str, bool],
) -> Callable[[Sequence[Message]], bool]:
    """``Dispatcher.send`` that, once armed, dies between the committed INSERT and the
    RPUSH, as a producer killed at the worst moment would."""

    def wrapped(messages: Sequence[Message]) -> bool:
        if armed["torn"] and messages:
            out.write(e="torn", task=name, ids=[m.job_id for m in messages], ts=time.time())
            os.kill(os.getpid(), signal.SIGKILL)
        return send(messages)

    return wrapped


if __name__ == "__main__":
    sys.exit(main())
