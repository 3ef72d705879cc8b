"""``Task.wait``: the record of a finished job at once, a wake-up on the commit's notice
(never lost, even when the commit lands between the waiter's read and its sleep), a
WaitTimeoutError, a JobNotFoundError for an unknown id, and ledger polling while Redis
is down. Many waiters in one process share one subscription."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
import redis
from support.backends import TaskFactory
from support.helpers import RedisServer, wait_for

from meepo import JobNotFoundError, JobRecord, MeepoError, Status, Task, WaitTimeoutError
from meepo import dispatch as dispatch_module
from meepo.records import Job, NewJob

pytestmark = pytest.mark.timeout(120)

LEASE = timedelta(seconds=30)
#: A waiter's sleep between reads when polling is off (``no_polling``), and its timeout.
SLEEP = 600.0
#: How long a woken waiter gets to return (far less than SLEEP).
WOKEN_WITHIN = 20.0


@pytest.fixture
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters read the ledger again only on a notice (or after SLEEP seconds, longer
    than any deadline of these tests): a wait that ends before its deadline was woken
    by the commit's notice."""
    monkeypatch.setattr(dispatch_module, "WAIT_SAFETY_POLL", SLEEP)


def _claim(task: Task, n: int = 1) -> list[Job]:
    """Claim ``n`` pushed jobs as a consumer would (pop, compare-and-set)."""
    jobs: list[Job] = []
    while len(jobs) < n:
        popped = task.dispatcher.pop_and_claim(n - len(jobs), timeout=1, lease=LEASE, worker="t")
        jobs.extend(popped.jobs)
    return jobs


class Waiter:
    """``task.wait`` in a thread (timeout SLEEP); ``result()`` gives it WOKEN_WITHIN
    seconds to return."""

    def __init__(self, task: Task, job_id: int, timeout: float = SLEEP) -> None:
        self.got: JobRecord | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(task, job_id, timeout), daemon=True)
        self.thread.start()

    def _run(self, task: Task, job_id: int, timeout: float) -> None:
        try:
            self.got = task.wait(job_id, timeout=timeout)
        except BaseException as exc:
            self.error = exc

    def result(self) -> JobRecord:
        self.thread.join(WOKEN_WITHIN)
        assert not self.thread.is_alive(), "the waiter slept through the commit's notice"
        if self.error is not None:
            raise self.error
        assert self.got is not None
        return self.got


def _watching(task: Task, job_id: int) -> bool:
    listener = task.transport.listener
    ch = listener._channels.get(task.transport.done_channel)
    return ch is not None and job_id in ch.watches and ch.confirmed.is_set()


def test_wait_returns_at_once_for_a_finished_job(make_task: TaskFactory) -> None:
    task = make_task()
    job_id = task.push(b"x")
    (job,) = _claim(task)
    task.commit(job_id, Status.FAILED, commit_id=job.commit_id, error="nope")
    rec = task.wait(job_id, timeout=0)
    assert rec.status is Status.FAILED and rec.last_error == "nope"


def test_wait_wakes_on_the_commit(make_task: TaskFactory, no_polling: None) -> None:
    task = make_task()
    job_id = task.push(b"x")
    (job,) = _claim(task)
    waiter = Waiter(task, job_id)
    wait_for(lambda: _watching(task, job_id), message="the waiter to subscribe")
    task.commit(job_id, Status.DONE, commit_id=job.commit_id)
    assert waiter.result().status is Status.DONE


def test_a_running_consumers_group_commit_wakes_its_waiters(
    make_task: TaskFactory, no_polling: None
) -> None:
    gate = threading.Event()

    def handler(job: Job) -> bytes:
        gate.wait(30)
        return b"ok %d" % job.id

    worker = make_task(job_func=handler, store_results=True, parallel_num=4)
    producer = make_task()  # another Task: its own subscription, as in another process
    ids = producer.push_many([b"a", b"b", b"c"])
    worker.start()
    waiters = [Waiter(producer, i) for i in ids]
    wait_for(lambda: all(_watching(producer, i) for i in ids), message="three waiters")
    gate.set()
    assert [w.result().result for w in waiters] == [b"ok %d" % i for i in ids]


def test_wait_times_out_with_a_timeout_error(make_task: TaskFactory) -> None:
    task = make_task()
    job_id = task.push(b"never run")
    with pytest.raises(WaitTimeoutError, match=f"job {job_id} .* still todo") as info:
        task.wait(job_id, timeout=0.2)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, MeepoError)
    with pytest.raises(WaitTimeoutError):
        task.wait(job_id, timeout=timedelta(0))


def test_wait_for_an_unknown_job_raises_at_once(make_task: TaskFactory) -> None:
    task = make_task()
    with pytest.raises(JobNotFoundError, match="has no job 987654321"):
        task.wait(987654321, timeout=60)


def test_a_job_of_another_task_is_unknown(make_task: TaskFactory) -> None:
    mine, other = make_task(), make_task("other_" + make_task().task_id)
    job_id = other.push(b"x")
    with pytest.raises(JobNotFoundError):
        mine.wait(job_id, timeout=60)


def test_no_wake_up_is_lost_when_the_commit_lands_between_read_and_sleep(
    make_task: TaskFactory, no_polling: None
) -> None:
    """The waiter reads the job (doing); before it goes to sleep the job is committed and
    its notice delivered. The sleep must end at once: the waiter subscribed before it
    read, so the notice set its event (a waiter that subscribed after reading, or that
    cleared the event after reading, would sleep through its whole timeout)."""
    task = make_task()
    job_id = task.push(b"x")
    (job,) = _claim(task)
    ledger = task.dispatcher.ledger
    real_get = ledger.get
    reads: list[Status] = []

    def get_then_commit(i: int, task_id: str | None = None) -> JobRecord | None:
        rec = real_get(i, task_id)
        if not reads:  # the first read: the commit and its notice come right after it
            assert rec is not None and rec.status is Status.DOING
            task.commit(job_id, Status.DONE, commit_id=job.commit_id)
            listener = task.transport.listener
            ch = listener._channels[task.transport.done_channel]
            wait_for(
                lambda: any(w.event.is_set() for w in ch.watches.get(job_id, ())),
                message="the notice to reach the waiter",
            )
        reads.append(rec.status if rec is not None else Status.TODO)
        return rec

    ledger.get = get_then_commit  # type: ignore[method-assign,assignment]
    try:
        rec = Waiter(task, job_id).result()
    finally:
        del ledger.get
    assert rec.status is Status.DONE
    assert reads == [Status.DOING, Status.DONE]


def test_a_commit_between_subscription_and_read_is_seen(make_task: TaskFactory) -> None:
    task = make_task()
    job_id = task.push(b"x")
    (job,) = _claim(task)

    def hook(i: int) -> None:
        task.commit(i, Status.DONE, commit_id=job.commit_id)

    task.dispatcher.after_subscribe = hook
    try:
        assert task.wait(job_id, timeout=20).status is Status.DONE
    finally:
        task.dispatcher.after_subscribe = None


def test_waiters_in_one_process_share_one_subscription(
    make_task: TaskFactory, no_polling: None
) -> None:
    task = make_task()
    ids = task.push_many([b"%d" % i for i in range(12)])
    jobs = _claim(task, len(ids))
    waiters = [Waiter(task, i) for i in ids]
    wait_for(lambda: all(_watching(task, i) for i in ids), message="every waiter")
    client: redis.Redis = task.transport.client
    channel = task.transport.done_channel
    assert dict(client.pubsub_numsub(channel)) == {channel.encode(): 1}
    for job in jobs:
        task.commit(job.id, Status.DONE, commit_id=job.commit_id)
    assert {w.result().id for w in waiters} == set(ids)


def test_wait_falls_back_to_the_ledger_while_redis_is_down(
    db_url: str, servers: Callable[..., RedisServer]
) -> None:
    server = servers()
    task = Task(f"down_{id(server)}", db_url, server.url, init_db=True)
    try:
        job_id = task.push(b"x")
        (job,) = _claim(task)
        server.stop()
        waiter = Waiter(task, job_id)
        wait_for(lambda: task.transport.listener._watching > 0, message="the waiter")
        # The commit's notice cannot be sent: the waiter finds the commit by reading.
        task.commit(job_id, Status.DONE, commit_id=job.commit_id)
        assert waiter.result().status is Status.DONE
        # A job that stays todo (written straight to the ledger: Redis is down).
        (todo,) = task.ledger.insert(
            task.task_id, [NewJob(b"y")], now=task.clock(), redispatch_timeout=LEASE
        )
        with pytest.raises(WaitTimeoutError):
            task.wait(todo.id, timeout=0.3)
    finally:
        task.stop()
        task.transport.close()


# -- wait_async ---------------------------------------------------------------------------


def test_wait_async_returns_a_finished_job_and_raises_like_wait(make_task: TaskFactory) -> None:
    import asyncio

    task = make_task()
    job_id = task.push(b"x")
    todo = task.push(b"y")
    (job, *_) = _claim(task)
    task.commit(job.id, Status.DONE, commit_id=job.commit_id)

    async def main() -> None:
        rec = await task.wait_async(job_id, timeout=0)
        assert rec.status is Status.DONE
        with pytest.raises(WaitTimeoutError, match="still todo"):
            await task.wait_async(todo, timeout=0.2)
        with pytest.raises(JobNotFoundError):
            await task.wait_async(10**12)

    asyncio.run(main())


def test_wait_async_is_woken_by_the_commit_and_never_blocks_the_loop(
    make_task: TaskFactory, no_polling: None
) -> None:
    """With polling off, only the commit's notice can end the wait before SLEEP; a
    ticker on the same loop keeps running while the waiter sleeps (it holds no thread
    and blocks nothing)."""
    import asyncio

    task = make_task()
    job_id = task.push(b"x")
    (job,) = _claim(task)

    async def main() -> tuple[JobRecord, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        waiting = asyncio.create_task(task.wait_async(job_id, timeout=SLEEP))
        while not _watching(task, job_id):
            await asyncio.sleep(0.01)
        seen = ticks
        await asyncio.to_thread(task.commit, job_id, Status.DONE, commit_id=job.commit_id)
        rec = await asyncio.wait_for(waiting, WOKEN_WITHIN)
        tick.cancel()
        return rec, ticks - seen

    rec, ticked = asyncio.run(main())
    assert rec.status is Status.DONE
    assert ticked > 0
