"""``Task``: the public face of meepo, composing the ledger, the transport and the runtime."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import redis as redis_lib
from sqlalchemy import Connection, Engine, event

from . import client, config, serializers
from .batch import Batch
from .client import Row, Stores
from .config import mask_url
from .errors import (
    CommitModeError,
    ConfigError,
    JobNotFoundError,
    MeepoError,
    NotRunningHereError,
    PayloadError,
    ScheduleNotFoundError,
    StaleCommitError,
    UnavailableError,
)
from .ledger import Outcome
from .ledger import migrate as migrations
from .ledger.bounds import Bounds
from .ledger.retention import Retention
from .ledger.schedules import Schedules, next_fires
from .middleware import Hooks, Middleware
from .offload import Offload
from .options import JobFunc, TaskOptions
from .records import DEFAULT_PRIORITY, JobRecord, Message, NewJob, ScheduleRecord, Status
from .runtime import Consumer, Promoter, Reaper, Scheduler, startup
from .runtime.cleaner import Cleaner
from .runtime.inline import InlineRunner
from .schedule import Spec, check_name
from .transport import Transport, io_timeout
from .transport.local import LocalTransport
from .urls import check_redis_url

log = logging.getLogger("meepo")

_migrated: set[tuple[str, str]] = set()
_migrate_lock = threading.Lock()


class Task:
    """A named queue of jobs: push from anywhere, consume where ``job_func`` is given.

    A Task without ``job_func`` is a producer: it pushes, commits, repushes and reads,
    and never starts consumers. Any number of processes may build a Task for the same
    task id at once. Every option: docs/operations.md, "Configuration reference".
    """

    def __init__(
        self,
        task_id: str,
        db: str | Engine | None = None,
        redis: str | redis_lib.Redis | None = None,
        job_func: JobFunc | None = None,
        *,
        parallel_num: int = 10,
        max_failed_times: int = 3,
        auto_commit: bool = True,
        zombie_dst_status: Status | str = Status.TODO,
        zombie_period: float | timedelta = 20.0,
        zombie_timeout: float | timedelta = 20.0,
        zombie_limit: int = 1000,
        table_name: str | None = None,
        list_name_prefix: str | None = None,
        init_db: bool = False,
        lease: float | timedelta | None = None,
        prefetch: int | None = None,
        shutdown_grace: float | timedelta = 30.0,
        poll_interval: float | timedelta = 0.5,
        max_payload_bytes: int = 1024 * 1024,
        priorities: Sequence[str] = config.DEFAULT_PRIORITIES,
        default_priority: str | None = None,
        retry_backoff: Any = config.DEFAULT_RETRY_BACKOFF,
        promote_interval: float | timedelta = 0.05,
        job_timeout: float | timedelta | None = None,
        retention: Mapping[str, Any] | None = None,
        clock: Callable[[], datetime] | None = None,
        middleware: Sequence[Middleware] = (),
        inline: bool = False,
        serializer: Any = "bytes",
        store_results: bool = False,
        max_result_bytes: int = 64 * 1024,
    ) -> None:
        # Every parameter is checked first (meepo.options), before any connection.
        opts = TaskOptions.from_kwargs(
            task_id,
            job_func,
            parallel_num=parallel_num,
            max_failed_times=max_failed_times,
            auto_commit=auto_commit,
            zombie_dst_status=zombie_dst_status,
            zombie_period=zombie_period,
            zombie_timeout=zombie_timeout,
            zombie_limit=zombie_limit,
            table_name=table_name,
            list_name_prefix=list_name_prefix,
            init_db=init_db,
            lease=lease,
            prefetch=prefetch,
            shutdown_grace=shutdown_grace,
            poll_interval=poll_interval,
            max_payload_bytes=max_payload_bytes,
            priorities=priorities,
            default_priority=default_priority,
            retry_backoff=retry_backoff,
            promote_interval=promote_interval,
            job_timeout=job_timeout,
            retention=retention,
            clock=clock,
            middleware=middleware,
            inline=inline,
            serializer=serializer,
            store_results=store_results,
            max_result_bytes=max_result_bytes,
        )
        self.retention = opts.retention
        #: How payloads and results become bytes (see meepo.serializers).
        self.serializer = opts.serializer
        self.task_id = opts.task_id
        self.options = opts.runtime
        self.default_priority = opts.default_priority
        self.retry_backoff = opts.retry_backoff
        self.table_name = opts.table_name
        self.list_name_prefix = opts.list_name_prefix
        self.job_func = opts.job_func
        #: The installed middleware (None without any: the runtime then skips every hook).
        self.hooks = Hooks.build(self, opts.middleware)
        self._clock_given = clock is not None
        self._clock_arg = clock
        #: The inline runner (``inline=True``, :func:`meepo.testing.inline`): push runs
        #: the jobs in the pushing thread; None: the task dispatches through Redis.
        self._inline: InlineRunner | None = None
        self._wire(db, redis, inline=opts.inline)
        self._consumer: Consumer | None = None
        self._stopped = threading.Event()  # set once stop() has finished: run() returns
        # Set as soon as stop() begins: a delayed start (waiting for the database) must not
        # start consumers after it.
        self._stop_requested = threading.Event()
        self._state_lock = threading.Lock()
        self._starter: threading.Thread | None = None  # start() waiting for the database
        self._start_error: MeepoError | None = None
        self._migrate_at_start = False
        self._hooks_started = False  # on_start ran, on_stop is owed
        #: The threads that run the async producer API's calls (started on first use).
        self.offload = Offload(f"meepo-{self.task_id}-push")
        self._own_services = True  # start() runs the reaper, promoter, scheduler, cleaner
        if opts.init_db:
            try:
                self.migrate()
            except UnavailableError as exc:
                if job_func is None:
                    raise
                # A worker must survive a database that is down at start: migrate then.
                log.warning("task %s: cannot migrate now (%s); will at start", task_id, exc)
                self._migrate_at_start = True

    def _wire(
        self, db: str | Engine | None, redis: str | redis_lib.Redis | None, *, inline: bool
    ) -> None:
        """Open the stores (one table and its Redis keys, as Admin opens them) and make
        the transport, the dispatchers and the services' stores. ``inline``: an
        in-process transport and an inline runner; no Redis client is made."""
        prios = self.options.priorities
        redispatch_timeout = timedelta(seconds=self.options.redispatch_timeout)
        self.stores = Stores(
            db,
            redis,
            table=self.table_name,
            prefix=self.list_name_prefix,
            redis_timeout=io_timeout(self.options.lease),
            clock=self._clock_arg,
        )
        self.engine = self.stores.engine
        self.ledger = self.stores.ledger
        # The database's clock, as this host estimates it (an injected clock, in tests,
        # replaces it everywhere).
        self.clock = self.stores.clock
        self.transport: Transport
        if inline:
            if isinstance(redis, str):
                check_redis_url(redis)  # a bad URL is still an error, not a silent pass
            self.transport = LocalTransport(
                self.task_id, self.list_name_prefix, prios, self.default_priority
            )
        else:
            self.stores.redis  # noqa: B018  made now: a bad URL fails here, not at a push
            self.transport = self.stores.transport(self.task_id, prios, self.default_priority)
        self.dispatcher = self.stores.dispatcher(self.transport, redispatch_timeout)
        # meepo's own threads (claim, committer, heartbeat, reaper, scheduler) run on a
        # pool of their own, every wait bounded from the lease: handlers holding
        # task.engine connections never starve them (docs/design.md invariant 9).
        self.bounds = Bounds.from_lease(self.options.lease)
        service_ledger = self.stores.service_ledger(self.bounds)
        self.service_engine = service_ledger.engine
        self.service_dispatcher = (
            self.dispatcher
            if service_ledger is self.ledger
            else self.stores.dispatcher(self.transport, redispatch_timeout, ledger=service_ledger)
        )
        self._reaper: Reaper | None = None
        self._promoter: Promoter | None = None
        self._scheduler: Scheduler | None = None
        self.cleaner = Cleaner(
            Retention(self.service_engine, self.table_name), self.task_id, self.retention
        )
        self.schedule_ledger = self.stores.schedules
        self._service_schedules = Schedules(self.service_engine, self.table_name)
        self._inline = None
        if inline and self.job_func is not None:
            self._inline = InlineRunner(
                self.dispatcher, self.options, self.job_func, self.clock, self.hooks
            )

    @property
    def redis(self) -> redis_lib.Redis:
        """The task's Redis client (made on first use in inline mode, which needs none)."""
        return self.stores.redis

    @property
    def inline(self) -> bool:
        """Whether push runs the jobs in the pushing thread (``inline=True``,
        :func:`meepo.testing.inline`): no Redis is used."""
        return isinstance(self.transport, LocalTransport)

    @contextlib.contextmanager
    def _inline_scope(
        self, *, raise_errors: bool = False, db: str | Engine | None = None
    ) -> Iterator[Task]:
        """Inline mode for the duration of the block (:func:`meepo.testing.inline`):
        another transport, dispatchers and runner (and with ``db`` another ledger, migrated
        first), the task's own restored at the end."""
        with self._state_lock:
            if self._consumer is not None or (
                self._starter is not None and self._starter.is_alive()
            ):
                raise ConfigError(
                    f"task {self.task_id!r} is consuming (start() was called): stop() it "
                    "before running it inline"
                )
        saved = dict(self.__dict__)
        own = self._inline
        own_raise = own.raise_errors if own is not None else False
        try:
            if db is not None:
                self._wire(db, None, inline=True)
                self.migrate()
            elif not self.inline:
                self._wire(self.stores._db, self.stores._redis_arg, inline=True)
            if self._inline is not None:
                self._inline.raise_errors = raise_errors
            yield self
        finally:
            runner = self._inline
            if runner is not None:
                runner.stop()
                if runner is own:  # an inline task's own runner: as it was
                    runner.raise_errors = own_raise
            keep = ("_stopped", "_stop_requested", "_state_lock")
            self.__dict__.update({k: v for k, v in saved.items() if k not in keep})

    def _run_inline(self) -> None:
        """Inline mode: run what is ready now (the caller's push, a retry, a repush)."""
        if self._inline is not None:
            self._inline.run_ready()

    def __repr__(self) -> str:
        return (
            f"Task({self.task_id!r}, db={mask_url(self.ledger.url)!r}, "
            f"redis={self.transport.where!r}, table={self.table_name!r})"
        )

    # -- schema -----------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring this task's ledger table to the head revision (the Alembic migrations)."""
        key = (self.ledger.url, self.table_name)
        with _migrate_lock:
            if key in _migrated:
                return
            migrations.upgrade(self.engine, self.table_name)
            _migrated.add(key)

    # -- producing --------------------------------------------------------------------

    def _check_payloads(self, payloads: Sequence[Any], many: bool = False) -> list[bytes]:
        """Payloads through the task's serializer, each checked against
        max_payload_bytes; a bad one is an error naming it, and nothing is written."""
        out: list[bytes] = []
        limit = self.options.max_payload_bytes
        codec = self.serializer
        for i, p in enumerate(payloads):
            if serializers.is_bytes(codec):
                where = f"payload #{i}" if many and len(payloads) > 1 else "payload"
            else:
                where = f"payloads[{i}]" if many else "payload"
            b = serializers.encode(codec, p, where)
            if len(b) > limit:
                raise PayloadError(f"{where} of {len(b)} bytes exceeds max_payload_bytes={limit}")
            out.append(b)
        return out

    def new_job(
        self,
        payload: Any,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
        key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> NewJob:
        """One job, validated (nothing is written): what :meth:`push` would write. Part
        of the producer interface :class:`~meepo.batch.Batch` builds on. ``payload``
        goes through the task's serializer (bytes by default)."""
        return self._new_job(
            self._check_payloads([payload])[0],
            delay=delay,
            run_at=run_at,
            priority=priority,
            key=key,
            unique_for=unique_for,
        )

    def _new_job(
        self,
        checked: bytes,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
        key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> NewJob:
        prio = (
            self.default_priority
            if priority is None
            else config.check_priority(priority, self.options.priorities)
        )
        due = config.due_time(self.clock(), delay, run_at)
        k, hold = config.check_key(key, unique_for)
        return NewJob(checked, due, prio, k, hold)

    def push(
        self,
        payload: Any,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
        key: str | None = None,
        unique_for: float | timedelta | None = None,
        connection: Any = None,
    ) -> int:
        """Store a job and dispatch it; returns its id once the ledger row is committed.

        ``delay`` (seconds or timedelta) or ``run_at`` (an aware datetime) make it due
        later; a negative delay or a past ``run_at`` is due now. ``priority`` names one
        of the task's ``priorities``. ``key`` makes it unique: while a job with that key
        is unfinished (or finished less than ``unique_for`` seconds ago), pushing
        returns that job's id and writes nothing.

        With ``connection`` (a SQLAlchemy Connection or ORM Session) the row joins the
        caller's transaction and is dispatched only after that transaction commits.
        """
        job = self.new_job(
            payload,
            delay=delay,
            run_at=run_at,
            priority=priority,
            key=key,
            unique_for=unique_for,
        )
        return self.push_jobs([job], connection)[0]

    def push_many(
        self,
        payloads: Sequence[Any],
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
        connection: Any = None,
    ) -> list[int]:
        """Store many jobs in one INSERT and dispatch them in one pipelined round trip;
        ``delay``/``run_at``/``priority`` apply to all of them."""
        if isinstance(payloads, (bytes, bytearray, str)):
            raise TypeError("push_many takes a sequence of payloads, not one payload")
        if not isinstance(payloads, Sequence):
            raise TypeError(
                f"push_many takes a sequence (a list) of payloads, not {type(payloads).__name__}"
            )
        checked = self._check_payloads(list(payloads), many=True)
        if not checked:
            return []
        first = self._new_job(checked[0], delay=delay, run_at=run_at, priority=priority)
        jobs = [NewJob(p, first.run_at, first.priority) for p in checked]
        return self.push_jobs(jobs, connection)

    def batch(self, connection: Any = None) -> Batch:
        """``with task.batch() as b: b.push(...)``: every job pushed in the block is
        written in one transaction when the block ends, and dispatched only after it
        commits; an exception in the block writes nothing. ``b.ids`` holds the ids, in
        push order, once the block is over. With ``connection`` (a Connection or
        Session) the rows join the caller's transaction instead. In async code,
        ``async with task.batch() as b:`` writes them without blocking the event loop
        (through the offload pool, as :meth:`push_async`)."""
        if connection is not None:
            _check_connection(connection)
        return Batch(self, connection)

    def push_jobs(self, jobs: list[NewJob], connection: Any = None) -> list[int]:
        """Write validated jobs (from :meth:`new_job`) and dispatch them; with
        ``connection``, inside the caller's transaction. Every push ends here."""
        hooks = self.hooks
        if hooks is not None:  # refusing raises MiddlewareError: nothing is written
            hooks.before_push(jobs)
        if connection is None:
            ids = self.dispatcher.push(jobs)
        else:
            ids = self._push_in_transaction(jobs, connection)
        if hooks is not None:
            hooks.after_push(jobs, ids)
        if self._inline is not None and connection is None:
            self._inline.run_ready()
        return ids

    # -- producing from async code ---------------------------------------------------

    async def push_async(
        self,
        payload: bytes,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
        key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> int:
        """:meth:`push`, awaited: the same ledger-first write and dispatch, run in the
        Task's small offload pool (meepo/offload.py), so the caller's event loop is
        never blocked. Returns the job's id once its row is committed. A cancelled
        ``push_async`` may still have pushed (like a push whose reply was lost): give
        the job a ``key`` where that matters."""
        push = functools.partial(
            self.push,
            payload,
            delay=delay,
            run_at=run_at,
            priority=priority,
            key=key,
            unique_for=unique_for,
        )
        return await self.offload.run(push)

    async def push_many_async(
        self,
        payloads: Sequence[bytes],
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: str | None = None,
    ) -> list[int]:
        """:meth:`push_many`, awaited (one INSERT, one pipelined dispatch), without
        blocking the event loop."""
        push = functools.partial(
            self.push_many, payloads, delay=delay, run_at=run_at, priority=priority
        )
        return await self.offload.run(push)

    async def push_jobs_async(self, jobs: list[NewJob]) -> list[int]:
        """:meth:`push_jobs`, awaited (``async with task.batch() as b`` ends here)."""
        return await self.offload.run(functools.partial(self.push_jobs, jobs))

    async def get_async(self, job_id: int) -> JobRecord | None:
        """:meth:`get`, awaited, without blocking the event loop."""
        return await self.offload.run(functools.partial(self.get, job_id))

    def _push_in_transaction(self, jobs: list[NewJob], connection: Any) -> list[int]:
        _check_connection(connection)
        if isinstance(connection, Connection):
            # meepo cannot observe a Connection's commit, so the rows are written as
            # never dispatched: the first dispatch sweep after the commit sends them.
            return self.dispatcher.insert(jobs, connection, due_now=True)[0]
        ids, messages = self.dispatcher.insert(jobs, connection.connection())
        # Messages wait for the session's real commit, tagged with the innermost
        # transaction (a savepoint, maybe) they were pushed in: rolling back a savepoint
        # drops only what was pushed inside it.
        inner = connection.get_nested_transaction() or connection.get_transaction()
        pending: list[_Pending] = connection.info.setdefault("meepo_pending", [])
        pending.append((inner, self._send_committed, messages))
        if not connection.info.get("meepo_hooked"):
            connection.info["meepo_hooked"] = True
            event.listen(connection, "after_commit", _session_committed)
            event.listen(connection, "after_soft_rollback", _session_rolled_back)
            event.listen(connection, "after_transaction_end", _session_transaction_ended)
        return ids

    def _send_committed(self, messages: list[Message]) -> None:
        """Dispatch the messages of a caller's committed transaction (inline: run them)."""
        self.dispatcher.send(messages)
        self._run_inline()

    # -- committing -------------------------------------------------------------------

    def commit(
        self,
        job_id: int,
        status: Status | str,
        *,
        commit_id: int | None = None,
        delay: float | timedelta | None = None,
        error: str | None = None,
        result: Any = None,
    ) -> None:
        """Finish a job in manual-commit mode: ``done``, ``failed`` or ``todo`` (run it
        again, after ``delay`` seconds if given).

        Inside the handler the claim is known; from elsewhere pass ``commit_id`` (the
        ``Job.commit_id`` the handler received). A stale commit_id raises
        StaleCommitError and changes nothing.

        ``result`` (``done`` only) is stored with the commit, through the task's
        serializer, whatever ``store_results``; one the serializer cannot write, or
        larger than ``max_result_bytes``, is a PayloadError and nothing is committed.
        """
        mine, outcome = self._manual_outcome(job_id, status, commit_id, delay, error, result)
        if mine is not None:
            # This process's claim: through the consumer's committer (its round trips
            # are shared), unless the consumer has stopped meanwhile.
            with contextlib.suppress(NotRunningHereError):
                mine.commit(outcome)
                return
        self._commit_elsewhere(outcome)

    async def commit_async(
        self,
        job_id: int,
        status: Status | str,
        *,
        commit_id: int | None = None,
        delay: float | timedelta | None = None,
        error: str | None = None,
        result: Any = None,
    ) -> None:
        """:meth:`commit`, awaited: from an ``async def`` handler, the wait for the
        group commit does not hold the event loop (the other handlers go on meanwhile);
        from elsewhere the commit runs in the offload pool. Same arguments and errors."""
        mine, outcome = self._manual_outcome(job_id, status, commit_id, delay, error, result)
        if mine is not None:
            with contextlib.suppress(NotRunningHereError):
                await mine.commit_async(outcome)
                return
        await self.offload.run(functools.partial(self._commit_elsewhere, outcome))

    def _manual_outcome(
        self,
        job_id: int,
        status: Status | str,
        commit_id: int | None,
        delay: float | timedelta | None,
        error: str | None,
        result: Any = None,
    ) -> tuple[Consumer | None, Outcome]:
        """The checked outcome of a manual commit, and the consumer holding its claim
        (None: commit it elsewhere, through the ledger)."""
        if self.job_func is not None and self.options.auto_commit:
            raise CommitModeError(
                f"task {self.task_id!r} commits automatically (auto_commit=True): the "
                "handler's return or exception is its commit; use auto_commit=False to "
                "commit by hand"
            )
        st = Status.parse(status)
        if st is Status.DOING:
            raise ValueError("commit status must be done, failed, todo or cancelled, not doing")
        raw = None
        if result is not None:
            if st is not Status.DONE:
                raise ValueError(f"a result goes with a done commit, not {st.value}")
            raw = serializers.check_result(self.serializer, result, self.options.max_result_bytes)
        consumer = self._consumer
        if consumer is None and self._inline is not None:
            consumer = self._inline.consumer
        held = consumer.held_claim(job_id) if consumer is not None else None
        if commit_id is None:
            if held is None:
                raise NotRunningHereError(
                    f"job {job_id} is not running in this process: pass commit_id= (the "
                    "Job.commit_id its handler received)"
                )
            commit_id = held[0]
        run_at = None
        if delay is not None and st is Status.TODO:
            run_at = self.clock() + timedelta(
                seconds=config.seconds(delay, "delay", allow_zero=True)
            )
        if consumer is not None and held is not None and held[0] == commit_id:
            return consumer, Outcome(job_id, commit_id, st, error, run_at, held[1], raw)
        return None, Outcome(job_id, commit_id, st, error, run_at, result=raw)

    def _commit_elsewhere(self, outcome: Outcome) -> None:
        """A manual commit of a claim this process's consumer does not hold."""
        # The ledger knows the job's priority (a re-dispatch goes to its own queue).
        outcome = dataclasses.replace(outcome, priority=DEFAULT_PRIORITY)
        self.dispatcher.commit_one(outcome)
        if self.hooks is not None:
            self.hooks.after_commit(outcome, True)
        if outcome.status is Status.TODO:
            self._run_inline()

    def repush(self, job_id: int) -> int:
        """Put a job of any status back on the queue as todo (failed_times reset to 0);
        returns its new commit_id. A running consumer's later commit is then stale."""

        def read(ids: list[int]) -> list[Row]:
            return self.ledger.find(task_id=self.task_id, ids=ids)

        rows = read([job_id])
        if not rows:
            raise JobNotFoundError(f"task {self.task_id!r} has no job {job_id}")
        done, skipped = client.repush(rows, lambda _: self.dispatcher, read)
        if done:
            self._run_inline()
            return done[0][1].commit_id
        if not skipped:  # deleted meanwhile
            raise JobNotFoundError(f"task {self.task_id!r} has no job {job_id}")
        raise StaleCommitError(job_id, rows[0][2], f"job {job_id} kept changing; try again")

    def cancel(self, job_id: int) -> bool:
        """Cancel a job; True if that changed anything.

        A todo job (due or delayed) becomes ``cancelled`` at once; its message is
        dropped when popped. A doing job is flagged: its handler sees
        ``job.cancel_requested`` turn True within a heartbeat interval, and the job
        becomes ``cancelled`` when the handler ends (returns, raises or commits; a
        manual commit then raises StaleCommitError), or when the reaper finds its worker
        dead. A finished job (done, failed, cancelled), or a running one already
        cancelled, is left as it is: False. JobNotFoundError for an unknown id."""

        def read(ids: list[int]) -> list[Row]:
            return self.ledger.find(task_id=self.task_id, ids=ids)

        rows = read([job_id])
        if not rows:
            raise JobNotFoundError(f"task {self.task_id!r} has no job {job_id}")
        done, skipped = client.cancel(rows, lambda _: self.dispatcher, read)
        if skipped:
            raise StaleCommitError(job_id, rows[0][2], f"job {job_id} kept changing; try again")
        return any(what != client.ALREADY for _, what in done)

    # -- reading ----------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord | None:
        """The job's ledger row, or None if this task has no such job; its ``result``
        and ``data`` decoded by the task's serializer."""
        return self._decoded(self.ledger.get(job_id, self.task_id))

    def _decoded(self, rec: JobRecord | None) -> JobRecord | None:
        if rec is None:
            return None
        return serializers.decode_record(self.serializer, rec)

    def wait(self, job_id: int, timeout: float | timedelta | None = 30.0) -> JobRecord:
        """Wait until the job is finished (done or failed) and return its record
        (``result`` decoded, as :meth:`get`).

        Raises WaitTimeoutError (a TimeoutError) if it is not finished within
        ``timeout`` seconds (None: no limit), JobNotFoundError at once if this task has
        no such job. Wakes up on the committer's notice through Redis (one subscription
        per process, shared by every waiter); with Redis unreachable it reads the
        ledger every half second instead."""
        limit = None if timeout is None else config.seconds(timeout, "timeout", allow_zero=True)
        rec = self.dispatcher.wait(job_id, limit)
        out = self._decoded(rec)
        assert out is not None
        return out

    async def wait_async(self, job_id: int, timeout: float | timedelta | None = 30.0) -> JobRecord:
        """:meth:`wait`, awaited: the waiter sleeps on the event loop (woken by the same
        notice) and reads the ledger in the offload pool, so it blocks neither the loop
        nor a thread while it waits. Same arguments, result and errors."""
        limit = None if timeout is None else config.seconds(timeout, "timeout", allow_zero=True)
        rec = await self.dispatcher.wait_async(job_id, limit, self.offload.run)
        out = self._decoded(rec)
        assert out is not None
        return out

    def depth(self) -> int:
        """Messages waiting in Redis for this task (all priority queues; delayed jobs
        are not counted until they fall due)."""
        return self.transport.depth()

    def depths(self) -> dict[str, int]:
        """Messages waiting per priority queue (highest first), and ``delayed``: jobs
        waiting in Redis for their due time."""
        out = self.transport.depths()
        out["delayed"] = self.transport.delayed_depth()
        return out

    # -- schedules --------------------------------------------------------------------

    def schedule_cron(
        self,
        name: str,
        expr: str,
        payload: Any,
        *,
        start: datetime | None = None,
        until: datetime | None = None,
        tz: str = "UTC",
        misfire: str = "one",
        priority: str | None = None,
    ) -> ScheduleRecord:
        """Declare (or update) the schedule ``name``: a job with ``payload`` at every
        fire time of the cron expression ``expr`` (5 fields, or 6 with the seconds
        last) in time zone ``tz``, from ``start`` to ``until`` (aware datetimes).

        Declaring the same settings again changes nothing; changed settings replace the
        old ones at once. Exactly one job per fire time whatever the number of workers.
        ``misfire`` (one, all, skip) says what happens to fires missed while no worker
        ran. Bad input is a ValueError and writes nothing."""
        spec = Spec.cron(
            name, expr, self._schedule_payload(payload), self._schedule_priority(priority),
            start=start, until=until, tz=tz, misfire=misfire,
        )  # fmt: skip
        return self.schedule_ledger.declare(self.task_id, spec, self.clock())[0]

    def schedule_every(
        self,
        name: str,
        every: float | timedelta,
        payload: Any,
        *,
        start: datetime | None = None,
        until: datetime | None = None,
        misfire: str = "one",
        priority: str | None = None,
    ) -> ScheduleRecord:
        """Declare (or update) the schedule ``name``: a job every ``every`` seconds
        (or timedelta), counted from ``start`` (default: the Unix epoch, so 3600 fires
        on the hour). Otherwise as :meth:`schedule_cron`."""
        spec = Spec.every(
            name, every, self._schedule_payload(payload), self._schedule_priority(priority),
            start=start, until=until, misfire=misfire,
        )  # fmt: skip
        return self.schedule_ledger.declare(self.task_id, spec, self.clock())[0]

    def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name``; False if there was none. Jobs it already made
        stay."""
        return self.schedule_ledger.remove(self.task_id, check_name(name))

    def schedules(self) -> list[ScheduleRecord]:
        """This task's schedules, by name."""
        return self.schedule_ledger.all(self.task_id)

    def next_fires(self, name: str, n: int = 5) -> list[datetime]:
        """The next ``n`` fire times of the schedule ``name`` (fewer when ``until``
        comes first; none once it is finished)."""
        config.positive_int(n, "n")
        rec = self.schedule_ledger.get(self.task_id, check_name(name))
        if rec is None:
            raise ScheduleNotFoundError(f"task {self.task_id!r} has no schedule {name!r}")
        return next_fires(rec, n)

    def _schedule_payload(self, payload: bytes) -> bytes:
        return self._check_payloads([payload])[0]

    def _schedule_priority(self, priority: str | None) -> str:
        if priority is None:
            return self.default_priority
        return config.check_priority(priority, self.options.priorities)

    # -- consuming --------------------------------------------------------------------

    @property
    def consumer(self) -> Consumer | None:
        return self._consumer

    @property
    def stopping(self) -> bool:
        """Whether a ``stop()`` has begun and this task's consumer has not stopped yet
        (running handlers are finishing their grace period)."""
        return self._stop_requested.is_set() and self._consumer is not None

    @property
    def reaper(self) -> Reaper:
        """This task's reaper (usable on its own, e.g. ``task.reaper.run_once()``)."""
        if self._reaper is None:
            self._reaper = Reaper(self.service_dispatcher, self.options, self.clock)
            self._reaper.hooks = self.hooks
        return self._reaper

    @property
    def promoter(self) -> Promoter:
        """This task's promoter of delayed jobs (``task.promoter.run_once()``)."""
        if self._promoter is None:
            self._promoter = Promoter(
                self.service_dispatcher, self.clock, self.options.promote_interval
            )
        return self._promoter

    @property
    def scheduler(self) -> Scheduler:
        """This task's scheduler of cron and periodic schedules
        (``task.scheduler.run_once()``)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(
                self._service_schedules, self.service_dispatcher, self.clock
            )
        return self._scheduler

    def start(self, services: bool = True) -> None:
        """Start the consumers, the reaper, the promoter, the scheduler and the cleaner
        in background threads. ``services=False``: the consumers only; the caller runs
        the other four (a multi-task worker's :class:`~meepo.runtime.shared.SharedLoop`,
        one thread per duty for every Task)."""
        if self.job_func is None:
            raise ConfigError(f"task {self.task_id!r} has no job_func: it can push but not consume")
        if self.inline:
            raise ConfigError(
                f"task {self.task_id!r} is inline: push() runs its jobs in the pushing "
                "thread, there are no consumers to start (see docs/testing.md)"
            )
        with self._state_lock:
            if self._consumer is not None and self._consumer.running:
                return
            if self._starter is not None and self._starter.is_alive():
                return
            self._stopped.clear()
            self._stop_requested.clear()
            self._start_error = None
            self._own_services = services
            try:
                self._check_ledger()
            except UnavailableError as exc:
                # The database is down: wait for it in the background, then start.
                self._starter = threading.Thread(
                    target=self._start_later,
                    args=(exc,),
                    name=f"meepo-{self.task_id}-starter",
                    daemon=True,
                )
                self._starter.start()
                return
            self._start_consumers()

    def _check_ledger(self) -> None:
        if self._migrate_at_start:
            self.migrate()
            self._migrate_at_start = False
        # One connection of the services' pool (the fetcher's first claim reuses it), one
        # statement: the schema's revision; the server's version comes with the
        # connection.
        migrations.check(self.service_engine, self.table_name)

    def _start_later(self, first: UnavailableError) -> None:
        try:
            ready = startup.wait_until_ready(
                self._check_ledger, self._stop_requested, self.task_id, first
            )
            with self._state_lock:
                if ready and not self._stop_requested.is_set():
                    log.warning("task %s: the database is reachable, starting", self.task_id)
                    self._start_consumers()
        except MeepoError as exc:
            log.error("task %s: cannot start: %s", self.task_id, exc)
            self._start_error = exc
            self._stopped.set()
        except Exception as exc:  # a bug must not leave a silent dead thread behind
            log.exception("task %s: cannot start: unexpected error", self.task_id)
            self._start_error = MeepoError(f"task {self.task_id!r} could not start: {exc!r}")
            self._stopped.set()

    def _start_consumers(self) -> None:
        assert self.job_func is not None
        self._consumer = Consumer(
            self.service_dispatcher, self.options, self.job_func, self.clock, self.retry_backoff
        )
        self._consumer.hooks = self.hooks
        if self.hooks is not None and not self._hooks_started:
            self._hooks_started = True
            self.hooks.on_start()
        self._consumer.start()
        if self._own_services:
            # They begin once the first claim is done (at most SETTLE_CAP later).
            for service in (self.reaper, self.promoter, self.scheduler, self.cleaner):
                service.not_before = self._consumer.settled
                service.start()
        log.info(
            "task %s: %d consumer(s) started on %s and %s",
            self.task_id,
            self.options.parallel_num,
            mask_url(self.ledger.url),
            self.transport.where,
        )

    def stop(self, wait: bool = True, grace: float | None = None) -> bool:
        """Stop consuming. With ``wait``, running jobs get ``grace`` seconds
        (``shutdown_grace`` by default) to finish and be committed; returns False if
        some were still running then (the reaper recovers them)."""
        if self._inline is not None:
            self._inline.stop()
        with self._state_lock:
            # From here on no delayed start starts consumers. The consumer stays
            # reachable until it has stopped: handlers finishing during the grace period
            # still commit with task.commit(job.id, ...) (manual mode).
            self._stop_requested.set()
            consumer = self._consumer
        clean = True
        if consumer is not None:
            if wait:
                clean = self._stop_consumer(consumer, grace)
            else:
                threading.Thread(
                    target=self._stop_consumer, args=(consumer, grace), daemon=True
                ).start()
        if self._reaper is not None:
            self._reaper.stop()
        if self._promoter is not None:
            self._promoter.stop()
        if self._scheduler is not None:
            self._scheduler.stop()
        self.cleaner.stop()
        if self.hooks is not None and self._hooks_started:
            self._hooks_started = False
            self.hooks.on_stop()
        self._stopped.set()
        return clean

    def _stop_consumer(self, consumer: Consumer, grace: float | None) -> bool:
        clean = consumer.stop(grace)
        with self._state_lock:
            if self._consumer is consumer:
                self._consumer = None
        return clean

    def run(self, *, burst: bool = False) -> None:
        """Consume until SIGINT/SIGTERM or ``stop()``; blocks.

        The first signal stops popping and lets running jobs finish (``shutdown_grace``);
        a second one exits the process at once (the reaper recovers what was running).
        The run loop and the signals are :class:`meepo.runtime.runner.Runner`'s, which
        ``meepo worker`` uses too.

        With ``burst=True`` it also stops, gracefully, and returns once nothing of the
        task is left to do: no job due now (ready, or delayed and fallen due) and none
        claimed by this worker and not committed (``meepo worker --burst``).
        """
        from .runtime.runner import Runner

        Runner([self], burst=burst).run()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until a ``stop()`` has finished (or a delayed start failed); whether it
        has."""
        return self._stopped.wait(timeout)

    @property
    def start_error(self) -> MeepoError | None:
        """Why a delayed start (waiting for the database) gave up, e.g. a SchemaError."""
        return self._start_error

    def __enter__(self) -> Task:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _check_connection(connection: Any) -> None:
    from sqlalchemy.orm import Session

    if not isinstance(connection, (Connection, Session)):
        raise TypeError(
            "connection must be a SQLAlchemy Connection or Session, "
            f"not {type(connection).__name__}"
        )


#: A transactional push waiting for its session's commit: the innermost transaction it
#: was pushed in, and what to send.
_Pending = tuple[Any, Callable[[list[Message]], None], list[Message]]


def _session_committed(session: Any) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: nothing is committed yet
    pending: list[_Pending] = session.info.pop("meepo_pending", [])
    for _, send, messages in pending:
        send(messages)


def _inside(transaction: Any, ancestor: Any) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


def _session_rolled_back(session: Any, previous_transaction: Any) -> None:
    """A rollback of a savepoint (or of the whole transaction) drops the messages of the
    pushes made inside it, and only those."""
    pending: list[_Pending] | None = session.info.get("meepo_pending")
    if pending:
        pending[:] = [p for p in pending if not _inside(p[0], previous_transaction)]


def _session_transaction_ended(session: Any, transaction: Any) -> None:
    if transaction.parent is None:  # ended without a commit (close()): nothing to send
        session.info.pop("meepo_pending", None)
