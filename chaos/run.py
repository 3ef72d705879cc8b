"""``make chaos``: run a real workload against real servers, inject faults on a seeded
schedule, then check meepo's invariants (``python -m chaos.run --help``).

For each backend the harness starts its own throwaway servers (a redis-server without
persistence and a PostgreSQL or MariaDB server in a temporary directory, each on a free
loopback port), so crashing them touches nobody else. It then starts 2 producers and
``--workers`` workers (``chaos/producer.py``, ``chaos/worker.py``), injects the faults of
the schedule while the producers push, lets the queue drain, stops the workers, and
checks the invariants from the ledger and the logs (``chaos/check.py``). The exit status
is non-zero when any invariant is violated. The same ``--seed`` gives the same workload
and the same fault schedule (what the operating system's scheduler does with it varies).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import heapq
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, func, make_url, select
from sqlalchemy.exc import SQLAlchemyError

from meepo import Task
from meepo.ledger.schema import jobs_table

from .check import Key, Outcome, Row, check
from .proxy import SilentProxy
from .records import AppendLog, read
from .servers import RedisServer, Server, database_server, free_port

ROOT = Path(__file__).resolve().parent.parent
TABLE = "chaos_jobs"
FAULT_KINDS = (
    "worker_kill",
    "worker_pause",
    "worker_sigterm",
    "worker_recycle",
    "db_partition",
    "redis_partition",
    "db_lock",
    "pool_hog",
    "redis_oom",
    "redis_readonly",
    "redis_restart",
    "redis_flushall",
    "db_restart",
    "producer_kill",
    "producer_torn_push",
)
#: How often each kind is drawn for the faults beyond one of each.
WEIGHTS = {
    "worker_kill": 4,
    "worker_pause": 1,
    "worker_sigterm": 2,
    "worker_recycle": 2,
    "db_partition": 2,
    "redis_partition": 1,
    "db_lock": 1,
    "pool_hog": 1,
    "redis_oom": 1,
    "redis_readonly": 1,
    "redis_restart": 1,
    "redis_flushall": 1,
    "db_restart": 1,
    "producer_kill": 1,
    "producer_torn_push": 1,
}
#: The worker faults: the target is a worker index.
WORKER_FAULTS = ("worker_kill", "worker_pause", "worker_sigterm", "worker_recycle")
ZOMBIE_TASKS = ("z-todo", "z-done", "z-failed")
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
#: Pushes the harness makes itself (hog jobs) are acknowledged in this log.
HARNESS_ACKS = 99
PRODUCERS = 2


@dataclass(order=True)
class Fault:
    at: float  # seconds after the workload began
    kind: str = field(compare=False)
    target: int = field(compare=False)  # worker or producer index
    length: float = field(compare=False)  # pause, outage, or delay before a restart


def plan(seed: int, duration: float, kinds: list[str], lease: float, workers: int) -> list[Fault]:
    """The fault schedule: one of each kind, then more drawn by weight (about one fault
    per 8 s), spread over 8%-80% of the run, while the producers push."""
    rng = random.Random(f"{seed}:faults")
    n = max(len(kinds), round(duration / 8))
    pool = [k for k in kinds for _ in range(WEIGHTS[k])]
    chosen = list(kinds) + [rng.choice(pool) for _ in range(n - len(kinds))]
    rng.shuffle(chosen)
    lo, hi = 0.08 * duration, 0.8 * duration
    slot = (hi - lo) / max(1, n)
    faults: list[Fault] = []
    for i, kind in enumerate(chosen):
        at = lo + slot * i + rng.uniform(0, 0.6 * slot)
        if kind.startswith("worker") or kind in ("db_partition", "redis_partition"):
            target = rng.randrange(workers)
        elif kind.startswith("producer"):
            target = rng.randrange(PRODUCERS)
        else:
            target = 0
        length = {
            "worker_kill": rng.uniform(0.2, 2.0),
            "worker_pause": lease + rng.uniform(2.0, 5.0),
            "redis_restart": rng.uniform(0.5, 3.0),
            "db_restart": rng.uniform(3.0, 8.0),
            "producer_kill": rng.uniform(0.2, 1.5),
            "db_partition": lease + rng.uniform(2.0, 5.0),
            "redis_partition": rng.uniform(3.0, 10.0),
            "db_lock": lease * 0.5,
            "pool_hog": lease * 1.5,
            "redis_oom": rng.uniform(4.0, 10.0),
            "redis_readonly": rng.uniform(4.0, 10.0),
        }.get(kind, 0.0)
        faults.append(Fault(round(at, 2), kind, target, round(length, 2)))
    return faults


def retried(call: Callable[[], Any], tries: int = 10) -> Any:
    """``call()``, tried again for about 10 s (a pooled connection that a database
    restart broke fails once)."""
    for _ in range(tries - 1):
        try:
            return call()
        except Exception:  # the last try raises it
            time.sleep(1.0)
    return call()


class Proc:
    """A producer or worker process, restarted under the same role and index."""

    def __init__(self, role: str, index: int, argv: list[str], log_path: Path) -> None:
        self.role, self.index, self.argv, self.log_path = role, index, argv, log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.paused_since: float | None = None
        self.expect_death = False  # the harness killed it (or armed its self-kill)
        self.restart_on_exit = False  # a graceful stop the harness asked for (SIGTERM)
        self.env: dict[str, str] = {}  # extra environment (faketime)
        self.skew = 0.0
        self.finished = False  # a producer that pushed its whole share
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def healthy(self) -> bool:
        return self.alive and self.paused_since is None and not self.expect_death

    def spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.paused_since = None
        self.expect_death = False
        self.restart_on_exit = False
        self.starts += 1


class Harness:
    def __init__(self, args: argparse.Namespace, backend: str) -> None:
        self.args = args
        self.backend = backend
        self.workdir = Path(tempfile.mkdtemp(prefix=f"meepo-chaos-{backend}-"))
        self.workdir.chmod(0o755)  # a database server may run as another user
        for sub in ("redis", "db", "logs"):
            (self.workdir / sub).mkdir()
        self.hlog = AppendLog(self.workdir / "harness.jsonl")
        self.redis = RedisServer(self.workdir / "redis")
        self.db: Server = database_server(backend, self.workdir / "db")
        self.db_up = threading.Event()
        self.procs: list[Proc] = []
        self.actions: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.threads: list[threading.Thread] = []
        run = f"{args.seed}-{os.getpid()}"
        self.task_ids = {"auto": f"chaos-auto-{run}", "manual": f"chaos-manual-{run}"}
        if not args.no_zombie_tasks:
            for name in ZOMBIE_TASKS:
                self.task_ids[name] = f"chaos-{name}-{run}"
        #: per worker index: silent proxies in front of the database and Redis
        self.proxies: dict[int, dict[str, SilentProxy]] = {}
        self.acks = AppendLog(self.workdir / "logs" / f"ack-{HARNESS_ACKS}.jsonl")
        self.task_names = {v: k for k, v in self.task_ids.items()}
        self.engine: Engine | None = None
        self.faults: list[Fault] = []
        self.last_push: float | None = None  # when the last producer finished
        self.notes: list[str] = []
        self.unexpected_exits: list[str] = []

    # -- scheduling -------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.actions, (when, next(self._seq), action))

    def run_due(self) -> None:
        now = time.time()
        while self.actions and self.actions[0][0] <= now:
            _, _, action = heapq.heappop(self.actions)
            action()

    # -- processes --------------------------------------------------------------------

    def common_args(self) -> list[str]:
        assert self.db_url is not None
        return [
            "--db", self.db_url,
            "--redis", self.redis.url,
            "--table", TABLE,
            "--auto-task", self.task_ids["auto"],
            "--manual-task", self.task_ids["manual"],
            "--zombie-tasks", ",".join(self.task_ids[n] for n in ZOMBIE_TASKS if n in self.task_ids),  # noqa: E501
            "--log-dir", str(self.workdir / "logs"),
            "--zombie-timeout", str(self.args.zombie_timeout),
        ]  # fmt: skip

    def add_proc(self, role: str, index: int, extra: list[str], skew: float = 0.0) -> Proc:
        argv = [sys.executable, "-m", f"chaos.{role}", *self.common_args(), *extra]
        if role == "worker":  # every worker reaches both servers through its own proxies
            assert self.db_url is not None
            db = SilentProxy(make_url(self.db_url).port or 0)
            rd = SilentProxy(self.redis.port)
            self.proxies[index] = {"db": db, "redis": rd}
            argv[argv.index(self.db_url)] = (
                make_url(self.db_url).set(port=db.port).render_as_string(False)
            )
            argv[argv.index(self.redis.url)] = f"redis://127.0.0.1:{rd.port}/0"
        proc = Proc(role, index, argv, self.workdir / f"{role}-{index}.log")
        if skew:
            proc.skew = skew
            proc.env = {
                "LD_PRELOAD": FAKETIME_LIB,
                "FAKETIME": f"{skew:+g}s",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "FAKETIME_NO_CACHE": "1",
            }
            proc.argv += ["--clock-offset", str(skew)]
        self.procs.append(proc)
        self.start_proc(proc)
        return proc

    def start_proc(self, proc: Proc) -> None:
        if proc.finished:
            return
        proc.spawn()
        self.hlog.write(
            e="spawn", role=proc.role, index=proc.index, pid=proc.pid, ts=time.time(),
            skew=proc.skew,
        )  # fmt: skip

    def kill(self, proc: Proc) -> float:
        """SIGKILL by pid; returns the time of death."""
        ts = time.time()
        proc.expect_death = True
        assert proc.popen is not None
        if proc.paused_since is not None:
            self.resume(proc)
        with contextlib.suppress(ProcessLookupError):  # already gone: reaped just below
            os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait()
        self.hlog.write(e="exit", role=proc.role, pid=proc.pid, ts=ts, rc=-9, by="harness")
        return ts

    def resume(self, proc: Proc) -> None:
        if proc.paused_since is None or not proc.alive:
            proc.paused_since = None
            return
        os.kill(proc.pid, signal.SIGCONT)
        self.hlog.write(e="paused", pid=proc.pid, since=proc.paused_since, until=time.time())
        proc.paused_since = None

    def supervise(self) -> None:
        for proc in self.procs:
            if proc.popen is None or proc.popen.returncode is not None:
                continue
            rc = proc.popen.poll()
            if rc is None:
                continue
            if proc.role == "producer" and rc == 0:
                self.hlog.write(e="exit", role=proc.role, pid=proc.pid, ts=time.time(), rc=rc)
                proc.finished = True
                self.last_push = max(self.last_push or 0.0, time.time())
                continue
            if proc.expect_death and rc == -signal.SIGKILL and proc.role == "producer":
                # a torn push: the producer killed itself; the harness restarts it
                self.hlog.write(e="exit", role=proc.role, pid=proc.pid, ts=time.time(), rc=rc)
                self.at(time.time() + 0.5, functools.partial(self.start_proc, proc))
                continue
            if proc.restart_on_exit:  # a graceful stop the harness asked for
                self.hlog.write(e="exit", role=proc.role, pid=proc.pid, ts=time.time(), rc=rc)
                if rc != 0:
                    self.unexpected_exits.append(
                        f"{proc.role} {proc.index} pid {proc.pid} rc {rc} after SIGTERM"
                    )
                proc.restart_on_exit = False
                self.at(time.time() + 0.3, functools.partial(self.start_proc, proc))
                continue
            if proc.expect_death:
                continue  # killed by the harness, which records it and restarts it
            self.hlog.write(e="exit", role=proc.role, pid=proc.pid, ts=time.time(), rc=rc)
            self.unexpected_exits.append(f"{proc.role} {proc.index} pid {proc.pid} rc {rc}")
            self.at(time.time() + 1.0, functools.partial(self.start_proc, proc))

    # -- ledger reads -----------------------------------------------------------------

    def ledger(self) -> Engine:
        if self.engine is None:
            assert self.db_url is not None
            self.engine = create_engine(
                self.db_url, pool_pre_ping=True, pool_size=2, connect_args={"connect_timeout": 2}
            )
        return self.engine

    def waiting(self, limit: int = 5000) -> list[tuple[str, int]]:
        """Jobs waiting (todo) right now, to time their recovery after a fault."""
        t = jobs_table(TABLE)
        try:
            with self.ledger().connect() as conn:
                rows = conn.execute(
                    select(t.c.task_id, t.c.id)
                    .where(t.c.task_id.in_(list(self.task_names)), t.c.status == "todo")
                    .limit(limit)
                ).all()
        except SQLAlchemyError:
            return []
        return [(self.task_names[r.task_id], int(r.id)) for r in rows]

    def claimed_by(self, pid: int) -> list[tuple[str, int]]:
        """Jobs a worker process holds a claim on (meepo names workers ``host:pid``)."""
        t = jobs_table(TABLE)
        try:
            with self.ledger().connect() as conn:
                rows = conn.execute(
                    select(t.c.task_id, t.c.id).where(
                        t.c.task_id.in_(list(self.task_names)),
                        t.c.status == "doing",
                        t.c.worker == f"{socket.gethostname()}:{pid}",
                    )
                ).all()
        except SQLAlchemyError:
            return []
        return [(self.task_names[r.task_id], int(r.id)) for r in rows]

    def unfinished(self) -> int | None:
        t = jobs_table(TABLE)
        try:
            with self.ledger().connect() as conn:
                return int(
                    conn.execute(
                        select(func.count())
                        .select_from(t)
                        .where(
                            t.c.task_id.in_(list(self.task_names)),
                            t.c.status.in_(["todo", "doing"]),
                        )
                    ).scalar_one()
                )
        except SQLAlchemyError:
            return None

    def final_rows(self) -> dict[Key, Row]:
        t = jobs_table(TABLE)
        with self.ledger().connect() as conn:
            rows = conn.execute(
                select(t.c.task_id, t.c.id, t.c.status, t.c.commit_id, t.c.failed_times).where(
                    t.c.task_id.in_(list(self.task_names))
                )
            ).all()
        return {
            (self.task_names[r.task_id], int(r.id)): Row(r.status, r.commit_id, r.failed_times)
            for r in rows
        }

    # -- faults -----------------------------------------------------------------------

    def pick(self, role: str, index: int) -> Proc | None:
        """The target of a fault, or another healthy process of that role if it is down."""
        procs = [p for p in self.procs if p.role == role and not p.finished]
        ordered = sorted(procs, key=lambda p: (p.index - index) % max(1, len(procs)))
        for p in ordered:
            if p.healthy:
                return p
        return None

    def inject(self, fault: Fault) -> None:
        ts = time.time()
        rec: dict[str, Any] = {"e": "fault", "kind": fault.kind, "ts": ts, "plan_at": fault.at}

        def skip(why: str) -> None:
            self.hlog.write(**rec, skipped=why)

        kind = fault.kind
        if kind in (*WORKER_FAULTS, "producer_kill", "producer_torn_push"):
            role = "worker" if kind.startswith("worker") else "producer"
            proc = self.pick(role, fault.target)
            if proc is None:
                return skip(f"no running {role}")
            rec.update(pid=proc.pid, index=proc.index)
            try:
                self.signal_fault(proc, fault, rec)
            except ProcessLookupError:  # it exited between the check and the signal
                return skip(f"the {role} exited")
            if role == "worker":
                # read after the signal: a dead or frozen process changes nothing more
                rec["orphans"] = self.claimed_by(proc.pid)
            self.hlog.write(**rec)
        elif kind in ("db_partition", "redis_partition"):
            proc = self.pick("worker", fault.target)
            if proc is None:
                return skip("no running worker")
            what = kind.split("_")[0]
            proxy = self.proxies[proc.index][what]
            if proxy.silent:
                return skip("already partitioned")
            proxy.partition()
            rec.update(pid=proc.pid, index=proc.index, length=fault.length, ts=time.time())
            if what == "db":
                rec["orphans"] = self.claimed_by(proc.pid)
            self.hlog.write(**rec)

            def heal() -> None:
                proxy.heal()
                self.hlog.write(
                    e="partitioned", what=what, index=proc.index, since=rec["ts"],
                    until=time.time(),
                )  # fmt: skip

            self.at(time.time() + fault.length, heal)
        elif kind == "db_lock":
            if not self.db_up.is_set():
                return skip("the database is down")
            th = threading.Thread(
                target=self.hold_locks, args=(fault, rec), name="db-lock", daemon=True
            )
            th.start()
            self.threads.append(th)
        elif kind == "pool_hog":
            th = threading.Thread(target=self.push_hogs, args=(fault, rec), daemon=True)
            th.start()
            self.threads.append(th)
        elif kind in ("redis_oom", "redis_readonly"):
            if not self.redis.running:
                return skip("redis is down")
            rec["sampled"] = time.time()
            rec["waiting"] = self.waiting()
            rec["ts"] = time.time()
            c = self.redis.client()
            try:
                if kind == "redis_oom":
                    used = int(c.info("memory")["used_memory"])
                    c.config_set("maxmemory-policy", "noeviction")
                    c.config_set("maxmemory", str(max(1024 * 1024, used // 2)))
                    rec["maxmemory"] = max(1024 * 1024, used // 2)
                    rec["used"] = used
                else:  # a replica of a primary that does not answer: read-only
                    c.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            except Exception as exc:
                return skip(f"redis: {exc}")
            finally:
                c.close()
            rec["length"] = fault.length
            self.hlog.write(**rec)
            self.at(time.time() + fault.length, functools.partial(self.redis_writable, kind))
        elif kind in ("redis_restart", "redis_flushall"):
            if not self.redis.running:
                return skip("redis is down")
            rec["sampled"] = time.time()
            rec["waiting"] = self.waiting()
            rec["ts"] = time.time()
            if kind == "redis_flushall":
                self.redis.flushall()
            else:
                self.redis.crash()
                rec["length"] = fault.length
                self.at(time.time() + fault.length, self.redis.start)
            self.hlog.write(**rec)
        elif kind == "db_restart":
            if not self.db_up.is_set():
                return skip("the database is down")
            rec["sampled"] = time.time()
            rec["waiting"] = self.waiting()
            self.db_up.clear()
            rec["ts"] = time.time()
            self.db.crash()

            def restart() -> None:
                time.sleep(fault.length)
                self.db.start()
                up = time.time()
                self.hlog.write(e="db_down", since=rec["ts"], until=up)
                self.hlog.write(**rec, up=up, length=round(up - rec["ts"], 2))
                self.db_up.set()

            th = threading.Thread(target=restart, name="db-restart", daemon=True)
            th.start()
            self.threads.append(th)
        return None

    def redis_writable(self, kind: str) -> None:
        if not self.redis.running:
            return
        c = self.redis.client()
        try:
            if kind == "redis_oom":
                c.config_set("maxmemory", "0")
            else:
                c.execute_command("REPLICAOF", "NO", "ONE")
        except Exception as exc:
            self.notes.append(f"{kind}: could not make redis writable again: {exc}")
        finally:
            c.close()

    def hold_locks(self, fault: Fault, rec: dict[str, Any]) -> None:
        """A slow database: a separate session holds row locks on running jobs (the
        auto task's) for ``fault.length`` seconds, then rolls back."""
        t = jobs_table(TABLE)
        try:
            with self.ledger().connect() as conn, conn.begin() as tx:
                rows = conn.execute(
                    select(t.c.id)
                    .where(t.c.task_id == self.task_ids["auto"], t.c.status == "doing")
                    .limit(5)
                    .with_for_update()
                ).all()
                rec.update(ts=time.time(), locked=[int(r.id) for r in rows])
                rec["length"] = fault.length
                time.sleep(fault.length)
                tx.rollback()
        except SQLAlchemyError as exc:
            rec["skipped"] = f"lock failed: {type(exc).__name__}"
        self.hlog.write(**rec)

    def push_hogs(self, fault: Fault, rec: dict[str, Any]) -> None:
        """A pool exhausted by handlers: jobs whose handlers each hold 10 connections of
        their task's engine for ``fault.length`` (longer than the lease)."""
        n = self.args.workers * 5
        hold = {"k": "hog", "h": fault.length, "c": 10}
        self.db_up.wait(60)  # after a database restart the schedule placed before it
        try:
            # after a MariaDB restart each dead pooled connection fails one push (with
            # a raw OperationalError or InterfaceError): up to the pool's size of tries
            ids = retried(
                lambda: self.setup_task().push_many([json.dumps(hold).encode()] * n), tries=45
            )
        except Exception as exc:  # the database may be down
            self.hlog.write(**rec, skipped=f"push failed: {type(exc).__name__}")
            return
        self.acks.write(e="ack", task="auto", ids=ids, ts=time.time(), nb=rec["ts"])
        rec.update(jobs=len(ids), length=fault.length)
        self.hlog.write(**rec)

    _setup: Task | None = None

    def setup_task(self) -> Task:
        if self._setup is None:
            assert self.db_url is not None
            self._setup = Task(
                self.task_ids["auto"], db=self.db_url, redis=self.redis.url, table_name=TABLE
            )
        return self._setup

    def signal_fault(self, proc: Proc, fault: Fault, rec: dict[str, Any]) -> None:
        if fault.kind == "worker_sigterm":
            os.kill(proc.pid, signal.SIGTERM)
            proc.expect_death = proc.restart_on_exit = True
            rec["ts"] = time.time()
        elif fault.kind == "worker_recycle":
            os.kill(proc.pid, signal.SIGUSR2)
            rec["ts"] = time.time()
        elif fault.kind in ("worker_kill", "producer_kill"):
            rec["ts"] = self.kill(proc)
            self.at(time.time() + fault.length, functools.partial(self.start_proc, proc))
        elif fault.kind == "worker_pause":
            os.kill(proc.pid, signal.SIGSTOP)
            proc.paused_since = rec["ts"] = time.time()
            rec["length"] = fault.length
            self.at(time.time() + fault.length, functools.partial(self.resume, proc))
        else:  # producer_torn_push
            os.kill(proc.pid, signal.SIGUSR1)
            proc.expect_death = True

    # -- the run ----------------------------------------------------------------------

    db_url: str | None = None
    skew = 0.0

    def run(self) -> tuple[Outcome, dict[str, Any]]:
        a = self.args
        self.redis.start()
        if not a.db_url:
            self.db.prepare()
            self.db.start()
        self.db_up.set()
        self.db_url = a.db_url or self.db.url
        setup = self.setup_task()
        setup.migrate()
        self.hlog.write(e="begin", backend=self.backend, seed=a.seed, ts=time.time())
        if a.schedule_every > 0:  # fires while the faults run; removed before the drain
            setup.schedule_every(
                "chaos-every", a.schedule_every, json.dumps({"k": "normal", "s": 1}).encode()
            )

        slow = a.lease * 1.5
        skew = 0.0
        if a.skew and Path(FAKETIME_LIB).exists():
            skew = a.skew * random.Random(f"{a.seed}:skew").choice([1, -1])
        elif a.skew:
            self.notes.append(f"clock skew skipped: {FAKETIME_LIB} is missing")
        self.skew = skew
        for i in range(a.workers):
            self.add_proc(
                "worker",
                i,
                [
                    "--parallel", str(a.parallel),
                    "--lease", str(a.lease),
                    "--zombie-period", str(a.zombie_period),
                    "--max-failed-times", str(a.max_failed_times),
                    "--slow", str(slow),
                ],
                skew=skew if i == a.workers - 1 else 0.0,
            )  # fmt: skip
        t0 = time.time() + 2.0
        spread = 0.85 * a.duration
        per = [a.jobs // PRODUCERS + (1 if i < a.jobs % PRODUCERS else 0) for i in range(2)]
        for i in range(PRODUCERS):
            self.add_proc(
                "producer",
                i,
                [
                    "--index", str(i),
                    "--quota", str(per[i]),
                    "--seed", str(a.seed),
                    "--t0", str(t0),
                    "--spread", str(spread),
                ],
            )  # fmt: skip
        kinds = [k for k in FAULT_KINDS if k not in a.skip]
        if a.db_url and "db_restart" in kinds:
            kinds.remove("db_restart")
            self.notes.append("db_restart skipped: --db-url is a server the harness does not own")
        faults = plan(a.seed, a.duration, kinds, a.lease, a.workers) if kinds else []
        for f in faults:
            self.at(t0 + f.at, functools.partial(self.inject, f))
        self.faults = faults

        # The fault window, then every restart and resume it scheduled.
        end = t0 + a.duration
        while time.time() < end or self.actions or not self.db_up.is_set():
            self.run_due()
            self.supervise()
            time.sleep(0.05)
        if a.schedule_every > 0:
            try:
                retried(lambda: setup.unschedule("chaos-every"), tries=45)
            except Exception as exc:
                self.notes.append(f"unschedule failed: {exc}")
        # Drain: the producers finish, every job reaches a terminal state.
        drained_at: float | None = None
        deadline = time.time() + a.drain_timeout
        last_poll = 0.0
        while time.time() < deadline:
            self.run_due()
            self.supervise()
            pushed = all(p.finished for p in self.procs if p.role == "producer")
            if pushed and time.time() - last_poll >= 0.5:
                last_poll = time.time()
                if self.unfinished() == 0:
                    drained_at = time.time()
                    break
            time.sleep(0.05)
        self.stop_workers()
        info = {
            "drained": drained_at is not None,
            "last_push_to_drained": None
            if drained_at is None or self.last_push is None
            else round(drained_at - self.last_push, 2),
            "end_to_drained": None if drained_at is None else round(drained_at - end, 2),
        }
        harness = list(read(self.workdir / "harness.jsonl"))
        outcome = check(self.workdir / "logs", self.final_rows(), a.max_failed_times, harness)
        outcome.figures["skew"] = self.skew
        if drained_at is None:
            outcome.violations.append(
                f"the queue did not drain within --drain-timeout {a.drain_timeout:.0f}s"
            )
        if self.unexpected_exits:
            info["unexpected_exits"] = self.unexpected_exits
        return outcome, info

    def stop_workers(self) -> None:
        workers = [p for p in self.procs if p.role == "worker" and p.alive]
        for p in workers:
            self.resume(p)
            p.expect_death = True
            os.kill(p.pid, signal.SIGTERM)
        deadline = time.time() + self.args.lease * 1.5 + 20
        for p in workers:
            assert p.popen is not None
            try:
                p.popen.wait(max(0.1, deadline - time.time()))
                rc = p.popen.returncode
            except subprocess.TimeoutExpired:
                self.notes.append(f"worker {p.index} did not stop on SIGTERM; killed")
                os.kill(p.pid, signal.SIGKILL)
                p.popen.wait()
                rc = -9
            self.hlog.write(e="exit", role="worker", pid=p.pid, ts=time.time(), rc=rc, by="stop")

    def cleanup(self) -> None:
        """Every process this harness started, by pid; then its servers."""
        for p in self.procs:
            if p.alive:
                assert p.popen is not None
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGKILL)
                p.popen.wait()
        for th in self.threads:
            th.join(90)
        if self.engine is not None:
            self.engine.dispose()
        for pair in self.proxies.values():
            for proxy in pair.values():
                with contextlib.suppress(OSError):
                    proxy.stop()
        for server in (self.db, self.redis):
            with contextlib.suppress(OSError, RuntimeError):
                server.stop()
        with contextlib.suppress(OSError):
            self.hlog.close()


def report(backend: str, h: Harness, out: Outcome, info: dict[str, Any], secs: float) -> str:
    a, f = h.args, out.figures
    status = ", ".join(f"{k} {v}" for k, v in sorted(f["status"].items()))
    failed_by = ", ".join(f"{k} {v}" for k, v in sorted(f["failed_by"].items())) or "none"
    excused = ", ".join(f"{k} {v}" for k, v in sorted(f["overlaps_excused"].items())) or "none"
    lines = [
        f"meepo chaos: {backend}, seed {a.seed}, duration {a.duration:.0f}s, "
        f"{a.workers} workers x {a.parallel} (+3 manual), lease {a.lease:g}s "
        f"[{secs:.0f}s wall]",
        f"  jobs: {f['acknowledged']} acknowledged, {f['ledger_rows']} in the ledger "
        f"({f['unacknowledged_rows']} never acknowledged), by task {f['by_task']}",
        f"  final: {status}; failed by {failed_by}",
        f"  lost: {f['lost']}   stuck: {f['stuck']}",
        f"  executions: {f['executions']} ({f['beyond_first']} beyond the first); "
        f"duplicates (beyond planned retries): {f['duplicates']}; "
        f"runs cut short by a kill or still frozen: {f['runs_killed_or_frozen']}",
        f"  overlapping runs: {f['overlaps']} ({f['overlaps_under_skew']} with the skewed "
        f"worker; set aside: {excused}); stale commits that "
        f"took effect: {f['stale_commits_taken']}; stale manual commits refused: "
        f"{f['stale_manual_commits_refused']}",
        f"  closed without ever starting: {f['closed_never_started'] or 0}; charged beyond "
        f"starts: {f['charged_beyond_starts']}; started before run_at: {f['early_starts']} "
        f"({f['early_starts_under_skew']} by the skewed worker itself); in-handler manual commits "
        f"refused: {f['manual_commits_refused']}; forks {f['forks']}; push errors "
        f"{f['push_errors']}; savepoint jobs {f['savepoint_jobs']} (worst ack to start "
        f"{f['savepoint_worst_ack_to_start']}s)",
        f"  drain: {'ok' if info['drained'] else 'TIMED OUT'}, "
        f"{info['last_push_to_drained']}s after the last push, "
        f"{info['end_to_drained']}s after the fault window",
        "  faults: kind, injected, survived (no violation before the next fault), "
        "duplicates after it, worst recovery:",
    ]
    for kind, slot in sorted(f["recovery"].items()):
        rec = slot["max_recovery"]
        extra = "".join(
            f", {k.replace('_', ' ')} {slot[k]}"
            for k in (
                "skipped", "orphans", "waiting", "longest_outage", "not_rerun", "not_recycled",
                "runs", "offset",
            )
            if slot.get(k)
        )  # fmt: skip
        lines.append(
            f"    {kind:<18} {slot['injected']:>3} {slot.get('survived', 0):>3} "
            f"{slot.get('duplicates', 0):>4}  {'-' if rec is None else f'{rec:.1f}s'}{extra}"
        )
    if info.get("unexpected_exits"):
        lines.append(f"  unexpected process exits (restarted): {len(info['unexpected_exits'])}")
    for note in h.notes:
        lines.append(f"  note: {note}")
    if out.violations:
        lines.append("  VIOLATIONS:")
        lines.extend(f"    - {v}" for v in out.violations)
    lines.append(f"  result: {'FAIL' if out.violations else 'PASS'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m chaos.run",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=120.0, help="fault window, seconds")
    p.add_argument("--backends", default="mariadb,postgres")
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--lease", type=float, default=6.0)
    p.add_argument("--zombie-timeout", type=float, default=10.0)
    p.add_argument("--zombie-period", type=float, default=2.0)
    p.add_argument("--max-failed-times", type=int, default=3)
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument(
        "--skip", default="", help=f"comma-separated fault kinds to leave out: {FAULT_KINDS}"
    )
    p.add_argument(
        "--db-url",
        default=None,
        help="use this database instead of a throwaway server (disables db_restart)",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument(
        "--skew",
        type=float,
        default=5.0,
        help="the last worker runs under faketime this many seconds off (sign drawn from "
        "the seed; 0: no skew)",
    )
    p.add_argument(
        "--schedule-every",
        type=float,
        default=1.0,
        help="a schedule on the auto task firing every N seconds during the faults (0: none)",
    )
    p.add_argument(
        "--no-zombie-tasks",
        action="store_true",
        help="leave out the three tasks with zombie_dst_status todo/done/failed",
    )
    args = p.parse_args(argv)
    args.skip = [k for k in args.skip.split(",") if k]
    bad = [k for k in args.skip if k not in FAULT_KINDS]
    if bad:
        p.error(f"unknown fault kind(s) {bad}")
    if args.workers < 1 or args.jobs < 1:
        p.error("--workers and --jobs must be positive")

    failed = False
    summaries: dict[str, dict[str, Any]] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        started = time.time()
        h = Harness(args, backend)
        atexit.register(h.cleanup)
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
        ok = False
        try:
            print(f"chaos: {backend}: running in {h.workdir}", flush=True)
            outcome, info = h.run()
            text = report(backend, h, outcome, info, time.time() - started)
            print(text, flush=True)
            summary = {"backend": backend, "figures": outcome.figures, "info": info}
            summary["violations"] = outcome.violations
            summary["faults"] = [f.__dict__ for f in h.faults]
            (h.workdir / "report.json").write_text(json.dumps(summary, indent=1, default=str))
            (h.workdir / "report.txt").write_text(text + "\n")
            summaries[backend] = summary
            ok = not outcome.violations
        finally:
            h.cleanup()
            atexit.unregister(h.cleanup)
            signal.signal(signal.SIGTERM, previous)
        if ok and not args.keep:
            shutil.rmtree(h.workdir, ignore_errors=True)
        else:
            print(f"chaos: {backend}: logs kept in {h.workdir}", flush=True)
        failed = failed or not ok
    if summaries:
        print(markdown(summaries), flush=True)
    return 1 if failed else 0


def markdown(summaries: dict[str, dict[str, Any]]) -> str:
    """The per-fault-kind table of docs/reliability.md's chaos report, one column per
    backend: injected / survived / lost / duplicates / worst recovery."""
    names = {"mariadb": "MariaDB", "postgres": "PostgreSQL"}
    backends = list(summaries)
    head = "| fault kind | " + " | ".join(names.get(b, b) for b in backends) + " |"
    lines = [
        "injected / survived / lost / duplicates / worst recovery (s), per fault kind:",
        "",
        head,
        "|---|" + "---:|" * len(backends),
    ]
    kinds = sorted({k for s in summaries.values() for k in s["figures"]["recovery"]})
    for kind in kinds:
        cells = []
        for b in backends:
            slot = summaries[b]["figures"]["recovery"].get(kind)
            if not slot or not slot.get("injected"):
                cells.append("-")
                continue
            rec = slot.get("max_recovery")
            cells.append(
                f"{slot['injected']} / {slot.get('survived', 0)} / 0 / "
                f"{slot.get('duplicates', 0)} / {'-' if rec is None else f'{rec:.1f}'}"
            )
        lines.append(f"| `{kind}` | " + " | ".join(cells) + " |")
    for label, key in (
        ("lost / stuck", ("lost", "stuck")),
        ("overlapping runs (of them with the skewed worker)", ("overlaps", "overlaps_under_skew")),
        ("closed done/failed without a start / charged beyond starts", (
            "closed_never_started", "charged_beyond_starts")),
        ("started before run_at", ("early_starts",)),
        ("runs in a forked child / manual commits refused in a stop / pushes refused", (
            "runs_in_forked_children", "manual_commits_refused", "push_errors")),
        ("duplicates (runs beyond planned retries)", ("duplicates",)),
    ):  # fmt: skip
        cells = []
        for b in backends:
            f = summaries[b]["figures"]
            vals = [f.get(k) for k in key]
            cells.append(" / ".join(
                str(sum(v.values()) if isinstance(v, dict) else (v or 0)) for v in vals
            ))  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| result | "
        + " | ".join("PASS" if not summaries[b]["violations"] else "FAIL" for b in backends)
        + " |"
    )
    return "\n".join(lines)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
