"""A model-based test of the job life cycle: Hypothesis drives meepo's real
ledger, transport, dispatcher and reaper with random sequences of push (plain, batched,
transactional), pop, claim (with stale, duplicate and foreign messages), heartbeat,
commit (group and manual, fresh and stale commit_id), release, clock moves, reaps,
sweeps, epoch checks, repushes and Redis data loss, and checks after every step that
the database and the Redis queue say exactly what a small in-memory model of the
allowed transitions says.

Nothing is mocked: a migrated database (SQLite, PostgreSQL, MariaDB), the shared Redis
(db 9; a lost Redis is simulated by deleting the task's keys), a fresh task id per
example. The clock is the model's: nothing sleeps.

What the model pins down (docs/design.md invariants):

* fencing: a transition is accepted only from the right status with the current
  commit_id, and then adds exactly one to commit_id (a claim: a random step of 1 to
  2**31); a stale claim, heartbeat or commit changes nothing (the whole row is compared
  after every step);
* one clock: a claim never takes a job before its run_at (it reports it early), and
  the reaper's locked step re-checks the lease it scanned: a heartbeat between the scan
  (``expired_leases``) and the locked step (``reap``) keeps the lease;
* one runner at a time: a job is ``doing`` only under a claim the model handed out;
* ledger first, transport as a cache: every pushed id keeps its row, the queue holds
  exactly the messages the model expects (as a multiset: ties in the reaper's order are
  the database's business), and after a Redis loss the epoch check puts every due todo
  job back on the queue;
* liveness: the ``drain`` rule plays a healthy consumer plus the reaper and requires
  every job to reach done or failed within a few rounds, whatever came before.

Runs are bounded for the normal test run (``MEEPO_MODEL_EXAMPLES`` examples of
``MEEPO_MODEL_STEPS`` steps each); raise both for a longer local run, e.g.
``MEEPO_MODEL_EXAMPLES=500 MEEPO_MODEL_STEPS=80 pytest tests/test_model.py``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete
from support.backends import MARIADB_URL, POSTGRES_URL, prepare, unique_task_id, unreachable

from meepo import JobNotFoundError, StaleCommitError, Status, Task, TransportUnavailableError
from meepo.ledger import NEVER_DISPATCHED, Outcome
from meepo.records import Pair
from meepo.runtime import recovery as recovery_module
from meepo.runtime.reaper import ReapReport
from meepo.transport.transport import decode

EXAMPLES = int(os.environ.get("MEEPO_MODEL_EXAMPLES", "30"))
STEPS = int(os.environ.get("MEEPO_MODEL_STEPS", "50"))
LONG_RUN = "MEEPO_MODEL_EXAMPLES" in os.environ or "MEEPO_MODEL_STEPS" in os.environ

# Generous: on a failure Hypothesis may spend up to 5 minutes shrinking it.
pytestmark = pytest.mark.timeout(0 if LONG_RUN else 420)

SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,  # no .hypothesis/ in the tree; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LEASE = timedelta(seconds=10)
TIMEOUT = timedelta(seconds=30)  # zombie_timeout: also the dispatch (re-send) deadline
MAX_JOBS = 12
ERROR = "boom"
#: An id no task of the test has (ids come from an auto-increment counter).
UNKNOWN_ID = 2**40
START = datetime(2031, 1, 1, 12, 0, tzinfo=timezone.utc)

STEP_MS = st.one_of(
    st.sampled_from(
        [
            1,
            1000,
            LEASE // timedelta(milliseconds=1),  # exactly at a lease's end: not yet expired
            LEASE // timedelta(milliseconds=1) + 1,
            TIMEOUT // timedelta(milliseconds=1),
            TIMEOUT // timedelta(milliseconds=1) + 1,
        ]
    ),
    st.integers(min_value=1, max_value=45_000),
)
DELAY = st.sampled_from([None, 0.0, 5.0])
#: What a consumer does with a claimed job (None: leaves it running).
VERDICTS = [Status.DONE, Status.DONE, Status.FAILED, Status.TODO, None]
PUSH_KINDS = ["push", "push_many", "push_many", "delayed", "committed", "rolled back"]
RUN_AT_OFFSET = st.sampled_from([None, -1.0, 0.0, 5.0])  # todo outcomes: when due again


@dataclass
class JobModel:
    status: Status
    commit_id: int
    failed_times: int
    run_at: datetime
    # lease end (doing: the ledger's expires_at) or dispatch deadline (todo: its
    # dispatch_deadline)
    expires_at: datetime | None
    updated_at: datetime
    transitions: int = 0  # accepted transitions so far
    started: datetime | None = None  # started_at: cleared by a claim, set by a commit
    orphaned: int = 0  # orphaned_claims: expired claims that had not started


class LedgerMachine(RuleBasedStateMachine):
    db_url: ClassVar[str]
    redis_url: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.jobs: dict[int, JobModel] = {}
        self.queue: Counter[Pair] = Counter()  # messages in Redis, as a multiset
        self.delayed: dict[Pair, datetime] = {}  # the delayed set: message -> due time
        self.inbox: list[Pair] = []  # popped by "a consumer", not yet claimed
        self.seen: list[Pair] = []  # every message ever popped (for stale claims)
        self.claims: list[Pair] = []  # every claim ever won: (id, commit_id after claim)
        self.lost_claims: set[Pair] = set()  # won on the server, the reply never arrived
        self.scanned: list[Any] | None = None  # the reaper's last scan, not yet reaped
        self.last_seen: dict[int, int] = {}  # commit_id at the last invariant check
        self._tokens = 0
        self.epoch: int | None = None  # the model's name for Redis's epoch token
        self.reaper_epoch: int | None = None  # the token the reaper last saw
        self.owed: tuple[int, bool] | None = None  # (epoch, lost): a recovery still owed
        self.recovered_epochs: set[int] = set()  # epochs whose recovery finished
        self.last_recovery: datetime | None = None  # the storm window's start
        self.task: Task | None = None
        self.committer: Task | None = None
        self.neighbour: Task | None = None
        self.foreign = 0
        self.unstarted = 0  # unstarted claims the model's last reap requeued

    # -- set-up and tear-down -----------------------------------------------------------

    @initialize(
        dst=st.sampled_from([Status.TODO, Status.TODO, Status.DONE, Status.FAILED]),
        max_failed=st.integers(min_value=1, max_value=3),
        initial=st.integers(min_value=1, max_value=6),
    )
    def setup(self, dst: Status, max_failed: int, initial: int) -> None:
        self.dst = dst
        self.max_failed = max_failed
        task_id = unique_task_id("model")
        common: dict[str, Any] = {
            "db": self.db_url,
            "redis": self.redis_url,
            "job_func": None,
            "clock": lambda: self.now,
            "zombie_timeout": TIMEOUT,
            "lease": LEASE,
        }
        self.task = Task(
            task_id, zombie_dst_status=dst, max_failed_times=max_failed, zombie_limit=1000, **common
        )
        # Another process that finishes jobs by hand (auto_commit=False producer).
        self.committer = Task(task_id, auto_commit=False, **common)
        # A job of another task in the same table: its message (a foreign message, as if
        # a list name were shared by mistake) may be mixed into claims; it never wins.
        self.neighbour = Task(unique_task_id("model"), **common)
        self.foreign = self.neighbour.push(b"not yours")
        self.seen.append((self.foreign, 0))
        self._push(initial, single=False)

    def teardown(self) -> None:
        for task in (self.task, self.neighbour):
            if task is None:
                continue
            prefix = task.transport.queue_key.removesuffix("queue")
            keys = list(task.redis.scan_iter(match=f"{prefix}*"))
            if keys:
                task.redis.delete(*keys)
            with task.engine.begin() as conn:
                table = task.ledger.table
                conn.execute(delete(table).where(table.c.task_id == task.task_id))

    @property
    def t(self) -> Task:
        assert self.task is not None
        return self.task

    # -- model helpers --------------------------------------------------------------------

    def _new_token(self) -> int:
        self._tokens += 1
        return self._tokens

    def _sent(self, pairs: Sequence[Pair], due: Sequence[datetime] | None = None) -> None:
        """The model of Transport.send: RPUSH (ZADD for a message due after now), and SET
        NX of the epoch."""
        if not pairs:
            return
        for k, pair in enumerate(pairs):
            if due is not None and due[k] > self.now:
                self.delayed[pair] = due[k]
            else:
                self.queue[pair] += 1
        if self.epoch is None:
            self.epoch = self._new_token()

    def _accept(self, job_id: int, step: int = 1, **values: Any) -> Pair:
        """One accepted transition: the new values, commit_id + step (1; a claim's is
        random). Returns the new pair."""
        m = self.jobs[job_id]
        for name, value in values.items():
            setattr(m, name, value)
        m.commit_id += step
        m.transitions += 1
        m.updated_at = self.now
        return job_id, m.commit_id

    def _current(self, pair: Pair, status: Status) -> bool:
        m = self.jobs.get(pair[0])
        return m is not None and m.status is status and m.commit_id == pair[1]

    def _apply_outcome(self, o: Outcome) -> None:
        """Ledger._outcome_values, for an outcome that won its compare-and-set."""
        m = self.jobs[o.job_id]
        m.started = m.started or self.now  # a commit records the start (COALESCE)
        if o.status is Status.DONE:
            self._accept(o.job_id, status=Status.DONE, expires_at=None)
        elif o.status is Status.FAILED:
            self._accept(
                o.job_id, status=Status.FAILED, expires_at=None, failed_times=m.failed_times + 1
            )
        else:
            due = o.run_at or self.now
            new = self._accept(
                o.job_id,
                status=Status.TODO,
                failed_times=m.failed_times + 1,
                run_at=due,
                expires_at=max(due, self.now) + TIMEOUT,
            )
            self._sent([new], [due])

    def _todo(self) -> list[int]:
        """Todo ids (due or not) in the order recovery sends them: (expires_at, id)."""
        todo = [
            (m.expires_at, i)
            for i, m in self.jobs.items()
            if m.status is Status.TODO and m.expires_at is not None
        ]
        return [i for _, i in sorted(todo)]

    def _fresh_claims(self) -> list[Pair]:
        return [p for p in self.claims if self._current(p, Status.DOING)]

    def _pick_claim(self, data: st.DataObject, *, fresh: bool) -> Pair:
        live = self._fresh_claims()
        pool = live if fresh and live else self.claims
        return data.draw(st.sampled_from(pool))

    # -- real call + model, shared by the rules and the drain ---------------------------

    def _push(self, n: int, single: bool, delay: float | None = None) -> list[int]:
        payloads = [b"job-%d" % i for i in range(n)]
        if single:
            ids = [self.t.push(payloads[0], delay=delay)]
        else:
            ids = self.t.push_many(payloads, delay=delay)
        assert len(ids) == n and len(set(ids)) == n
        due = self.now + timedelta(seconds=delay or 0)
        for job_id in ids:
            assert job_id not in self.jobs
            self.jobs[job_id] = JobModel(
                Status.TODO, 0, 0, due, max(due, self.now) + TIMEOUT, updated_at=self.now
            )
        self._sent([(i, 0) for i in ids], [due] * len(ids))
        return ids

    def _pop(self, count: int) -> list[Pair]:
        got = [decode(bytes(m)) for m in self.t.transport.pop(count, timeout=0)[1]]
        assert len(got) == min(count, self.queue.total())
        pairs: list[Pair] = []
        for p in got:
            assert p is not None, "a message meepo cannot read"
            assert self.queue[p] > 0, f"popped {p}, which the model never queued"
            self.queue[p] -= 1
            pairs.append(p)
        self.queue = +self.queue
        self.inbox.extend(pairs)
        self.seen.extend(pairs)
        return pairs

    def _claim(self, pairs: Sequence[Pair]) -> list[Pair]:
        lease_until = self.now + LEASE
        doing_before = {i for i, m in self.jobs.items() if m.status is Status.DOING}
        jobs = self.t.ledger.claim(
            self.t.task_id, pairs, now=self.now, lease=LEASE, worker="model:1"
        )
        got = {j.id: j for j in jobs}
        expect: list[tuple[int, int]] = []
        early: list[Pair] = []
        for pair in sorted(set(pairs)):
            if self._current(pair, Status.TODO):
                if self.jobs[pair[0]].run_at > self.now:
                    early.append(pair)  # not due: never claimed before its run_at
                    continue
                assert pair[0] in got, f"claim of {pair} lost"
                step = got[pair[0]].commit_id - pair[1]
                assert 1 <= step <= 2**31, f"claim step {step}"
                self._accept(
                    pair[0], step, status=Status.DOING, expires_at=lease_until, started=None
                )
                expect.append((pair[0], self.jobs[pair[0]].failed_times))
        # One runner at a time: a doing job (lease alive or not) is never claimed.
        assert not doing_before & {j.id for j in jobs}
        assert [(j.id, j.failed_times) for j in jobs] == expect
        assert [(m.job_id, m.commit_id) for m in jobs.early] == early
        won = [(j.id, j.commit_id) for j in jobs]
        self.claims.extend(won)
        return won

    def _finish(self, outcomes: Sequence[Outcome]) -> None:
        expect = {
            (o.job_id, o.commit_id)
            for o in outcomes
            if self._current((o.job_id, o.commit_id), Status.DOING)
        }
        won = self.t.dispatcher.finish(outcomes).won
        assert won == expect
        for o in outcomes:
            if (o.job_id, o.commit_id) in won:
                self._apply_outcome(o)

    def _model_epoch_check(self, fail_page: int | None = None) -> list[int]:
        """Reaper.check_epoch: a missing token is created; a token the reaper has not
        seen (or one it created) means Redis lost its data, and a recovery is owed: every
        todo job is sent again (later ones to the delayed set), unless one ran less than
        zombie_timeout ago (the storm window). Returns the ids sent, in order.

        ``fail_page``: the page (of 2 rows, 0-based) whose send fails; the pages before
        it were sent, and the recovery stays owed (the caller expects the error)."""
        created = self.epoch is None
        if created:
            self.epoch = self._new_token()
        assert self.epoch is not None
        previous, self.reaper_epoch = self.reaper_epoch, self.epoch
        if previous != self.epoch and not (previous is None and not created):
            lost = previous is not None or (self.owed is not None and self.owed[1])
            self.owed = (self.epoch, lost)
        if self.owed is None:
            return []
        if self.last_recovery is not None and self.now - self.last_recovery < TIMEOUT:
            return []
        epoch, lost = self.owed
        if epoch in self.recovered_epochs:
            self.owed = None
            return []
        todo = self._todo()
        if fail_page is not None:
            todo = todo[: 2 * fail_page]
        self._sent([(i, self.jobs[i].commit_id) for i in todo], [self.jobs[i].run_at for i in todo])
        if fail_page is not None:
            return todo
        self.recovered_epochs.add(epoch)
        self.owed = None
        if todo and lost:
            self.last_recovery = self.now
        return todo

    def _recovery_fails_at(self) -> int | None:
        """The page (of 2) whose send fails in the recovery an epoch check would run
        now, if it has a second page to fail on (the model's state is left as it was)."""
        saved = (
            self.epoch,
            self.reaper_epoch,
            self.owed,
            set(self.recovered_epochs),
            self.last_recovery,
            self._tokens,
            Counter(self.queue),
            dict(self.delayed),
        )
        sent = self._model_epoch_check()
        (
            self.epoch,
            self.reaper_epoch,
            self.owed,
            self.recovered_epochs,
            self.last_recovery,
            self._tokens,
            self.queue,
            self.delayed,
        ) = saved
        return 1 if len(sent) > 2 else None

    def _check_epoch(self) -> None:
        got = self.t.reaper.check_epoch()
        todo = self._model_epoch_check()
        assert got == len(todo)
        # After a recovery every todo job is on the queue or in the delayed set.
        queued = self._real_queue()
        delayed = self._real_delayed()
        for i in todo:
            pair = (i, self.jobs[i].commit_id)
            assert queued[pair] > 0 or pair in delayed

    def _promote(self) -> None:
        moved, _ = self.t.promoter.run_once()
        due = sorted(p for p, when in self.delayed.items() if when <= self.now)
        for p in due:
            del self.delayed[p]
            self.queue[p] += 1
        assert moved == len(due)

    def _cutoff(self, length: int, head: Pair | None) -> datetime:
        """Reaper.sweep's choice, from the queue's head."""
        if length == 0:
            return self.now
        if head is not None and self._current(head, Status.TODO):
            deadline = self.jobs[head[0]].expires_at
            assert deadline is not None
            return min(self.now, deadline)
        return NEVER_DISPATCHED + timedelta(microseconds=1)

    def _model_sweep(self, length: int, head: Pair | None) -> int:
        cutoff = self._cutoff(length, head)
        picked = sorted(
            i
            for i, m in self.jobs.items()
            if m.status is Status.TODO
            and m.expires_at is not None
            and m.expires_at < cutoff
            and m.run_at <= self.now
        )
        self._sent([self._accept(i, expires_at=self.now + TIMEOUT) for i in picked])
        return len(picked)

    def _model_reap(self) -> tuple[int, int]:
        requeued: list[Pair] = []
        closed = 0
        self.unstarted = 0
        for i, m in sorted(self.jobs.items()):
            if m.status is not Status.DOING or m.expires_at is None or m.expires_at >= self.now:
                continue
            if m.started is None:  # never started: back to todo, uncharged
                requeued.append(
                    self._accept(
                        i,
                        status=Status.TODO,
                        orphaned=m.orphaned + 1,
                        expires_at=self.now + TIMEOUT,
                    )
                )
                self.unstarted += 1
            elif self.dst is Status.TODO and m.failed_times + 1 < self.max_failed:
                requeued.append(
                    self._accept(
                        i,
                        status=Status.TODO,
                        failed_times=m.failed_times + 1,
                        expires_at=self.now + TIMEOUT,
                    )
                )
            else:
                final = Status.FAILED if self.dst is Status.TODO else self.dst
                self._accept(i, status=final, failed_times=m.failed_times + 1, expires_at=None)
                closed += 1
        self._sent(requeued)
        return len(requeued), closed

    def _run_once(self) -> None:
        length, head = self.t.transport.head()
        report = self.t.reaper.run_once(reap=True)
        # The model's run_once: epoch check, then sweep, then reap.
        sent = self._model_epoch_check()
        due = [i for i in sent if self.jobs[i].run_at <= self.now]
        if due and length == 0:  # the sweep then sees the first recovered message
            length, head = len(due), (due[0], self.jobs[due[0]].commit_id)
        swept = self._model_sweep(length, head)
        requeued, closed = self._model_reap()
        assert report == ReapReport(len(sent), swept, requeued, closed, self.unstarted)

    def _real_queue(self) -> Counter[Pair]:
        key = self.t.transport.queue_key
        raw: list[bytes] = self.t.redis.lrange(key, 0, -1)  # type: ignore[assignment]
        pairs = [decode(bytes(m)) for m in raw]
        assert None not in pairs
        return Counter(p for p in pairs if p is not None)

    def _real_delayed(self) -> dict[Pair, datetime]:
        key = self.t.transport.delayed_key
        raw: list[tuple[bytes, float]] = self.t.redis.zrange(key, 0, -1, withscores=True)  # type: ignore[assignment]
        out: dict[Pair, datetime] = {}
        for member, score in raw:
            head, _, priority = bytes(member).rpartition(b":")
            assert priority == b"default"
            pair = decode(head)
            assert pair is not None
            out[pair] = datetime.fromtimestamp(score, timezone.utc)
        return out

    # -- rules: producers -------------------------------------------------------------

    @precondition(lambda self: len(self.jobs) < MAX_JOBS)
    @rule(n=st.integers(min_value=1, max_value=3), how=st.sampled_from(PUSH_KINDS))
    def push(self, n: int, how: str) -> None:
        """push, push_many, or push_many on the caller's Connection (committed: never
        dispatched until the sweep sends it; rolled back: it never existed)."""
        if how in ("push", "push_many", "delayed"):
            self._push(1 if how == "push" else n, how == "push", 5.0 if how == "delayed" else None)
            return
        with self.t.engine.connect() as conn:
            ids = self.t.push_many([b"tx"] * n, connection=conn)
            if how == "committed":
                conn.commit()
            else:
                conn.rollback()
        for job_id in ids:
            if how == "committed":
                self.jobs[job_id] = JobModel(
                    Status.TODO, 0, 0, self.now, NEVER_DISPATCHED, updated_at=self.now
                )
            else:
                assert self.t.get(job_id) is None

    # -- rules: a consumer, by hand ------------------------------------------------------

    @precondition(lambda self: self.queue)
    @rule(count=st.integers(min_value=1, max_value=4), data=st.data())
    def pop(self, count: int, data: st.DataObject) -> None:
        """Pop a batch; most often claim it at once, as the consumer's fetcher does."""
        self._pop(count)
        if self.inbox and data.draw(st.integers(0, 3), label="claim now (unless 0)") != 0:
            self.claim(data)

    @precondition(lambda self: self.queue)
    @rule(count=st.integers(min_value=1, max_value=4), data=st.data())
    def consume(self, count: int, data: st.DataObject) -> None:
        """A consumer's whole turn: pop, claim, run, commit each job as done, failed or
        todo (by group commit or by hand), or leave it running (a slow handler, or a
        consumer that died with the claim)."""
        self._pop(count)
        popped, self.inbox = self.inbox, []
        outcomes: list[Outcome] = []
        for job_id, commit_id in self._claim(popped) if popped else []:
            verdict = data.draw(st.sampled_from(VERDICTS), label=f"verdict for {job_id}")
            if verdict is None:
                continue
            run_at = None
            if verdict is Status.TODO:
                offset = data.draw(RUN_AT_OFFSET, label="run_at offset")
                if offset is not None:
                    run_at = self.now + timedelta(seconds=offset)
            outcome = Outcome(job_id, commit_id, verdict, ERROR, run_at)
            if data.draw(st.booleans(), label="commit by hand"):
                assert self.committer is not None
                self.committer.commit(job_id, verdict, commit_id=commit_id, error=ERROR)
                self._apply_outcome(Outcome(job_id, commit_id, verdict, ERROR, None))
            else:
                outcomes.append(outcome)
        self._finish(outcomes)

    @precondition(lambda self: self.inbox or self.seen)
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        """Claim popped messages; sometimes with an old or duplicate message mixed in."""
        pairs: list[Pair] = []
        if self.inbox:
            n = data.draw(st.integers(min_value=1, max_value=len(self.inbox)), label="take")
            pairs, self.inbox = self.inbox[:n], self.inbox[n:]
        if self.seen and (not pairs or data.draw(st.booleans(), label="add a stale one")):
            pairs.append(data.draw(st.sampled_from(self.seen), label="stale or duplicate"))
        self._claim(pairs)

    @precondition(lambda self: self.inbox)
    @rule(data=st.data())
    def claim_reply_lost(self, data: st.DataObject) -> None:
        """A claim that committed on the server but whose reply never arrived: nobody
        holds it, so nobody renews, starts or commits it; once its lease expires the
        reaper must requeue it uncharged (it never started)."""
        n = data.draw(st.integers(min_value=1, max_value=len(self.inbox)), label="take")
        pairs, self.inbox = self.inbox[:n], self.inbox[n:]
        won = self._claim(pairs)  # the model learns the tokens (as a get() would)
        for pair in won:
            self.claims.remove(pair)
        self.lost_claims.update(won)

    @precondition(lambda self: self.inbox)
    @rule()
    def consumer_dies_before_claiming(self) -> None:
        self.inbox.clear()

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        """Renew leases: fresh claims are extended, stale ones are reported lost."""
        pairs = data.draw(
            st.lists(st.sampled_from(self.claims), min_size=1, max_size=3), label="claims"
        )
        if data.draw(st.booleans(), label="with a fresh one") and self._fresh_claims():
            pairs.append(data.draw(st.sampled_from(self._fresh_claims()), label="fresh"))
        lease_until = self.now + LEASE
        renewal = self.t.ledger.heartbeat(pairs, lease=LEASE, now=self.now)
        expect_lost: set[Pair] = set()
        for p in set(pairs):
            if self._current(p, Status.DOING):
                self.jobs[p[0]].expires_at = lease_until  # not a transition
            else:
                expect_lost.add(p)
        assert renewal.lost == expect_lost
        assert renewal.skipped == set()  # no other transaction holds a row lock
        assert renewal.renewed == set(pairs) - expect_lost

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """The consumer's group commit (auto-commit): fresh and stale claims mixed."""
        n = data.draw(st.integers(min_value=1, max_value=3), label="outcomes")
        outcomes: list[Outcome] = []
        for _ in range(n):
            job_id, commit_id = self._pick_claim(data, fresh=data.draw(st.integers(0, 3)) > 0)
            if any(o.job_id == job_id for o in outcomes):
                continue  # one verdict per job and batch, as a consumer sends
            status = data.draw(st.sampled_from([Status.DONE, Status.FAILED, Status.TODO]))
            run_at = None
            if status is Status.TODO:
                offset = data.draw(RUN_AT_OFFSET, label="run_at offset")
                if offset is not None:
                    run_at = self.now + timedelta(seconds=offset)
            error = None if status is Status.DONE else ERROR
            outcomes.append(Outcome(job_id, commit_id, status, error, run_at))
        self._finish(outcomes)

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Shutdown: claimed jobs that never started go back to todo, no failure
        counted (stale claims are skipped)."""
        pairs = {self._pick_claim(data, fresh=data.draw(st.booleans())) for _ in range(2)}
        self.t.dispatcher.release([(i, c, "default") for i, c in sorted(pairs)])
        back = [p for p in sorted(pairs) if self._current(p, Status.DOING)]
        self._sent(
            [self._accept(i, status=Status.TODO, expires_at=self.now + TIMEOUT) for i, _ in back]
        )

    @precondition(lambda self: self.jobs)
    @rule(
        data=st.data(),
        status=st.sampled_from([Status.DONE, Status.FAILED, Status.TODO]),
        delay=DELAY,
    )
    def manual_commit(self, data: st.DataObject, status: Status, delay: float | None) -> None:
        """task.commit(id, status, commit_id=…) from another process (auto_commit=False):
        a fresh claim takes effect; anything else is StaleCommitError and changes
        nothing; an unknown id (or another task's) is JobNotFoundError."""
        assert self.committer is not None
        which = data.draw(st.sampled_from(["claim", "claim", "current", "unknown", "foreign"]))
        if which in ("unknown", "foreign"):
            job_id = UNKNOWN_ID if which == "unknown" else self.foreign
            with pytest.raises(JobNotFoundError):
                self.committer.commit(job_id, status, commit_id=0, delay=delay)
            return
        if which == "claim" and self.claims:
            job_id, commit_id = self._pick_claim(data, fresh=data.draw(st.booleans()))
        else:  # a job's current commit_id, whatever its status
            job_id = data.draw(st.sampled_from(sorted(self.jobs)), label="job")
            commit_id = self.jobs[job_id].commit_id
        if self._current((job_id, commit_id), Status.DOING):
            self.committer.commit(job_id, status, commit_id=commit_id, delay=delay)
            run_at = None
            if status is Status.TODO and delay is not None:
                run_at = self.now + timedelta(seconds=delay)
            self._apply_outcome(Outcome(job_id, commit_id, status, ERROR, run_at))
            return
        before = self.t.get(job_id)
        with pytest.raises(StaleCommitError) as err:
            self.committer.commit(job_id, status, commit_id=commit_id, delay=delay)
        assert (err.value.job_id, err.value.commit_id) == (job_id, commit_id)
        assert self.t.get(job_id) == before

    # -- rules: time, reaper, admin, Redis -------------------------------------------------

    @precondition(lambda self: self.jobs)
    @rule(ms=STEP_MS)
    def advance(self, ms: int) -> None:
        self.now += timedelta(milliseconds=ms)

    @precondition(lambda self: self.jobs)
    @rule(what=st.sampled_from(["run_once", "reap", "sweep", "check_epoch"]))
    def reaper(self, what: str) -> None:
        """One reaper pass (epoch check + sweep + reap), or one of its parts alone."""
        if what == "run_once":
            self._run_once()
        elif what == "reap":
            assert self.t.reaper.reap() == self._model_reap()
        elif what == "sweep":
            length, head = self.t.transport.head()
            assert self.t.reaper.sweep() == self._model_sweep(length, head)
        else:
            self._check_epoch()

    @precondition(lambda self: self.jobs)
    @rule()
    def reaper_scan(self) -> None:
        """The reaper's first step alone: read the expired leases (a separate
        transaction from the locked step, which a later rule takes)."""
        zombies = self.t.ledger.expired_leases(self.t.task_id, now=self.now, limit=1000)
        expect = {
            i
            for i, m in self.jobs.items()
            if m.status is Status.DOING and m.expires_at is not None and m.expires_at < self.now
        }
        assert {z.id for z in zombies} == expect
        for z in zombies:
            assert (z.commit_id, z.failed_times) == (
                self.jobs[z.id].commit_id,
                self.jobs[z.id].failed_times,
            )
        self.scanned = list(zombies)

    @precondition(lambda self: self.scanned is not None)
    @rule()
    def reaper_locked_step(self) -> None:
        """The reaper's locked step on what the last scan read, whatever happened since
        (a heartbeat that renewed a lease, a commit, a claim, a clock move): only the
        leases still doing under the scanned commit_id and still expired are reaped."""
        zombies, self.scanned = self.scanned or [], None
        requeued, closed, _ = self.t.ledger.reap(
            zombies,
            dst=self.dst,
            max_failed_times=self.max_failed,
            redispatch_timeout=TIMEOUT,
            now=self.now,
        )
        self.t.dispatcher.send(requeued)
        expect_requeued: list[Pair] = []
        expect_closed = 0
        for z in zombies:
            m = self.jobs[z.id]
            if not self._current((z.id, z.commit_id), Status.DOING):
                continue  # moved since the scan
            if m.expires_at is None or m.expires_at >= self.now:
                continue  # renewed since the scan: its lease is alive
            if not z.started:
                expect_requeued.append(
                    self._accept(
                        z.id,
                        status=Status.TODO,
                        orphaned=m.orphaned + 1,
                        expires_at=self.now + TIMEOUT,
                    )
                )
            elif self.dst is Status.TODO and m.failed_times + 1 < self.max_failed:
                expect_requeued.append(
                    self._accept(
                        z.id,
                        status=Status.TODO,
                        failed_times=m.failed_times + 1,
                        expires_at=self.now + TIMEOUT,
                    )
                )
            else:
                final = Status.FAILED if self.dst is Status.TODO else self.dst
                self._accept(z.id, status=final, failed_times=m.failed_times + 1, expires_at=None)
                expect_closed += 1
        self._sent(expect_requeued)
        assert sorted((r.job_id, r.commit_id) for r in requeued) == sorted(expect_requeued)
        assert closed == expect_closed

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def repush(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.jobs)), label="job")
        got = self.t.repush(job_id)
        new = self._accept(
            job_id,
            status=Status.TODO,
            failed_times=0,
            run_at=self.now,
            expires_at=self.now + TIMEOUT,
        )
        self._sent([new])
        assert got == new[1]

    @precondition(lambda self: self.epoch is not None)
    @rule()
    def lose_redis(self) -> None:
        """Redis restarted empty (or was flushed): the task's queue, delayed set and
        epoch are gone."""
        t = self.t.transport
        self.t.redis.delete(t.queue_key, t.epoch_key, t.delayed_key)
        self.queue.clear()
        self.delayed.clear()
        self.epoch = None

    @precondition(lambda self: self.jobs)
    @rule()
    def recovery_fails_half_way(self) -> None:
        """An epoch check whose recovery (pages of 2 rows) fails on its 2nd page (Redis
        refuses writes): the first page was sent, and the recovery stays owed, to be
        retried by the next epoch check."""
        fail = self._recovery_fails_at()
        real_send = self.t.transport.send
        calls: list[int] = []

        def send(messages: Sequence[Any], now: datetime | None = None) -> None:
            calls.append(len(messages))
            if len(calls) == 2:
                raise TransportUnavailableError("dispatch failed: OOM (the model's fault)")
            real_send(messages, now)

        chunk = recovery_module.ROWS_PER_STATEMENT  # type: ignore[attr-defined]
        recovery_module.ROWS_PER_STATEMENT = 2  # type: ignore[attr-defined]
        self.t.transport.send = send  # type: ignore[method-assign]
        try:
            if fail is None:
                got = self.t.reaper.check_epoch()
                assert got == len(self._model_epoch_check())
            else:
                with pytest.raises(TransportUnavailableError):
                    self.t.reaper.check_epoch()
                self._model_epoch_check(fail_page=fail)
        finally:
            recovery_module.ROWS_PER_STATEMENT = chunk  # type: ignore[attr-defined]
            del self.t.transport.send

    @precondition(lambda self: self.delayed)
    @rule()
    def promote(self) -> None:
        """The promoter: delayed messages due by now move to their queue."""
        self._promote()

    @precondition(lambda self: any(not m.status.terminal for m in self.jobs.values()))
    @rule()
    def drain(self) -> None:
        """Liveness: a healthy consumer and the reaper finish every job in a few rounds
        (messages in dead consumers' hands, expired leases, lost Redis data and
        never-dispatched rows included)."""
        self.inbox.clear()
        for _ in range(6):
            self._promote()
            while self.queue:
                self._pop(100)
            popped, self.inbox = self.inbox, []
            won = self._claim(popped) if popped else []
            self._finish([Outcome(i, c, Status.DONE) for i, c in won])
            if all(m.status.terminal for m in self.jobs.values()):
                break
            self.now += LEASE + TIMEOUT + timedelta(seconds=6)
            self._run_once()
        left = {i: m.status for i, m in self.jobs.items() if not m.status.terminal}
        assert not left, f"jobs not finished after the drain: {left}"

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def ledger_matches_model(self) -> None:
        if self.task is None:
            return
        held = set(self.claims) | self.lost_claims
        for job_id, m in self.jobs.items():
            rec = self.t.get(job_id)
            assert rec is not None, f"job {job_id} was lost"
            got = (rec.status, rec.commit_id, rec.failed_times)
            assert got == (m.status, m.commit_id, m.failed_times), (job_id, got, m)
            assert (rec.started_at, rec.orphaned_claims) == (m.started, m.orphaned), (
                job_id,
                rec,
                m,
            )
            # the model's one deadline is the ledger's lease end while doing, its
            # dispatch deadline while todo; the other column is empty
            lease = m.expires_at if m.status is Status.DOING else None
            dispatch = m.expires_at if m.status is Status.TODO else None
            assert (rec.run_at, rec.expires_at, rec.dispatch_deadline, rec.updated_at) == (
                m.run_at,
                lease,
                dispatch,
                m.updated_at,
            ), (job_id, rec, m)
            # commit_id only grows, at least by one per accepted transition.
            assert rec.commit_id >= self.last_seen.get(job_id, 0)
            assert rec.commit_id >= m.transitions
            self.last_seen[job_id] = rec.commit_id
            # doing only under a claim someone was handed.
            if rec.status is Status.DOING:
                assert (job_id, rec.commit_id) in held
        assert self.neighbour is not None
        other = self.neighbour.get(self.foreign)
        assert other is not None and (other.status, other.commit_id) == (Status.TODO, 0)

    @invariant()
    def queue_matches_model(self) -> None:
        if self.task is None:
            return
        assert self._real_queue() == self.queue
        assert self._real_delayed() == self.delayed
        has_epoch = bool(self.t.redis.exists(self.t.transport.epoch_key))
        assert has_epoch == (self.epoch is not None)


def _ledger_url(backend: str, tmp_path: Path) -> str:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'model.sqlite3'}",
        "postgres": POSTGRES_URL,
        "mariadb": MARIADB_URL,
    }[backend]
    try:
        prepare(url)  # this xdist worker's database is created when missing
    except Exception as exc:
        unreachable(backend, str(exc).splitlines()[0])
    return url


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mariadb"])
def test_job_life_cycle_matches_model(backend: str, tmp_path: Path, redis_url: str) -> None:
    db_url = _ledger_url(backend, tmp_path)
    machine = type(
        f"LedgerMachine_{backend}",
        (LedgerMachine,),
        {"db_url": db_url, "redis_url": redis_url},
    )
    run_state_machine_as_test(machine, settings=SETTINGS)
