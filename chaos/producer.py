"""A chaos producer process: pushes its share of the workload at a steady pace and logs
every id a push returned (the acknowledged set) to ``ack-<index>.jsonl``.

Pushes are a seeded mix of ``push``, ``push_many``, and ``push_many`` inside the
caller's transaction (a SQLAlchemy ``Connection``, or an ORM ``Session``), a tenth of
which are rolled back on purpose (their ids are not acknowledged). A fifth of the plain
pushes are delayed (up to 3 s) and a third carry a ``high`` or ``low`` priority. About
a tenth of the jobs go to the manual-commit task.

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

AUTO_KINDS = (("normal", 0.956), ("flaky", 0.03), ("poison", 0.01), ("slow", 0.004))
MANUAL_KINDS = (("m-done", 0.8), ("m-fail", 0.07), ("m-retry", 0.08), ("m-none", 0.05))


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
            time.sleep(min(0.05, (acked - due + 1) * args.spread / args.quota))
            continue
        n = 1 if rng.random() < 0.35 else rng.randint(2, 40)
        n = min(n, args.quota - acked)
        batch: dict[str, list[bytes]] = {"auto": [], "manual": []}
        for _ in range(n):
            seq += 1
            name = "manual" if rng.random() < args.manual_fraction else "auto"
            kind = pick(rng, MANUAL_KINDS if name == "manual" else AUTO_KINDS)
            payload = {"k": kind, "p": args.index, "b": boots, "n": seq}
            batch[name].append(json.dumps(payload).encode())
        mode = rng.random()
        rollback = rng.random() < 0.1
        try:
            got: dict[str, list[int]] = {}
            if mode < 0.6:
                delay = rng.uniform(0.0, 3.0) if rng.random() < 0.2 else None
                priority = rng.choice(["high", "default", "default", "default", "low"])
                for name, ps in batch.items():
                    if ps:  # acknowledged one push at a time: a later failure keeps these
                        ids = _plain(tasks[name], ps, delay, priority)
                        out.write(e="ack", task=name, ids=ids, ts=time.time())
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
                    if rollback:
                        raise RolledBack
        except RolledBack:
            continue
        except (MeepoError, SQLAlchemyError) as exc:
            logging.getLogger("chaos").warning("push failed (%s); retrying", exc)
            time.sleep(0.2)
            continue
        for name, ids in got.items():
            out.write(e="ack", task=name, ids=ids, ts=time.time())
            acked += len(ids)
    out.write(e="finished", pid=os.getpid(), ts=time.time(), acked=acked)
    out.close()
    return 0


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
