"""Redis refusing writes, losing replies, going back in time, against throwaway
redis-servers and a TCP proxy; on every database.

* the reaper's epoch check, sweep and reap are independent: a Redis out of memory under
  ``noeviction``, a read-only replica or a Redis that is down does not stop the
  ledger-only lease scan;
* a Redis-loss recovery that fails half-way, or whose process dies, stays owed: it is
  retried, or taken over once its lock expires;
* a pop whose reply was lost is not sent again (the messages it took are re-sent by the
  sweep);
* a Redis restored from an older snapshot, or a lagging replica promoted, keeps its
  epoch token: the epoch counter tells, and every todo job is re-sent;
* a Redis that keeps losing its epoch key (``allkeys-*`` eviction) costs at most one
  re-send of every todo job per ``zombie_timeout`` and process;
* a silent Redis (partition) holds no reaper step for more than about a third of the
  lease.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import pytest
import redis
from support.helpers import Clock, RedisServer, TcpProxy, claim_and_die, queued, record, wait_for

from meepo import Status, Task, TransportUnavailableError
from meepo.ledger import NEVER_DISPATCHED
from meepo.runtime import recovery as recovery_module
from meepo.runtime.reaper import ReapReport

pytestmark = pytest.mark.timeout(180)

TaskFactory = Callable[..., Task]


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=10)


def in_thread(fn: Callable[[], ReapReport], timeout: float = 30) -> ReapReport:
    """Run a reaper pass in a thread: a pass that hangs is a missed deadline, not a hung
    test."""
    out: list[ReapReport] = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    wait_for(lambda: out, timeout=timeout, message="the reaper pass")
    return out[0]


# -- the reaper keeps reaping while Redis refuses writes ----------------------


@pytest.mark.parametrize("fault", ["out of memory", "read-only replica", "down"])
def test_reaper_reaps_while_redis_refuses_writes(
    make_task: TaskFactory,
    servers: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo")
    server = servers("--maxmemory-policy", "noeviction")
    clock = Clock()
    task = make_task(redis=server.url, clock=clock, zombie_timeout=2.0)
    dead, waiting = task.push_many([b"claimed by a dead worker", b"waiting"])
    claim_and_die(task, [dead], lease=2.0)
    assert task.reaper.run_once(reap=True) == ReapReport()  # learns the epoch
    client = admin(server)
    if fault == "out of memory":
        client.config_set("maxmemory", 1)  # below usage: every write is refused (OOM)
    elif fault == "read-only replica":
        primary = servers()
        client.replicaof("127.0.0.1", primary.port)
        wait_for(lambda: client.info("replication")["master_link_status"] == "up")
    else:
        server.stop()

    clock.advance(3)
    report = task.reaper.run_once(reap=True)  # old code: raised at the epoch check
    assert (report.requeued, report.closed) == (1, 0)
    assert "epoch" in report.errors
    rec = record(task, dead)
    assert (rec.status, rec.failed_times) == (Status.TODO, 1)
    assert rec.dispatch_deadline == NEVER_DISPATCHED  # its message could not be sent: swept later
    lines = [r.getMessage() for r in caplog.records]
    assert any("reaper step 'epoch' failed" in m for m in lines)

    if fault == "out of memory":  # heal; then a worker runs both jobs
        client.config_set("maxmemory", 0)
    elif fault == "read-only replica":
        client.replicaof("no", "one")
    else:
        server.start()
    runs: list[int] = []
    worker = make_task(
        redis=server.url, clock=clock, job_func=lambda job: runs.append(job.id), poll_interval=0.1
    )
    worker.start()
    wait_for(lambda: all(record(task, i).status is Status.DONE for i in (dead, waiting)))
    assert sorted(set(runs)) == sorted([dead, waiting])


# -- a failed recovery is retried, a dead one taken over ---------------------


def test_recovery_that_fails_half_way_is_retried(
    make_task: TaskFactory, servers: Callable[..., RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers("--maxmemory-policy", "noeviction")
    clock = Clock()
    a = make_task(redis=server.url, clock=clock, zombie_timeout=600.0)
    b = make_task(redis=server.url, clock=clock, zombie_timeout=600.0)
    ids = a.push_many([b"%d" % i for i in range(5)])
    assert a.reaper.run_once().recovered == 0  # both learn the epoch
    assert b.reaper.run_once().recovered == 0
    client = admin(server)
    client.delete(a.transport.queue_key, a.transport.epoch_key)  # Redis lost its data

    monkeypatch.setattr(recovery_module, "ROWS_PER_STATEMENT", 2)  # pages of 2 rows
    real_send = a.transport.send
    pages: list[int] = []

    def send_then_fill(messages: list, now: object = None) -> None:  # type: ignore[type-arg]
        real_send(messages, now)  # type: ignore[arg-type]
        pages.append(len(messages))
        if len(pages) == 1:  # Redis refuses writes after the first page
            client.config_set("maxmemory", 1)

    monkeypatch.setattr(a.transport, "send", send_then_fill)
    with pytest.raises(TransportUnavailableError, match="maxmemory"):
        a.reaper.check_epoch()
    assert len(queued(a)) == 2
    client.config_set("maxmemory", 0)

    assert a.reaper.check_epoch() == len(ids)  # old code: "nothing to recover" from now on
    assert {i for i, _ in queued(a)} == set(ids)
    assert b.reaper.run_once().recovered == 0  # done once for this epoch


def test_recovery_of_a_dead_process_is_taken_over(make_task: TaskFactory) -> None:
    a = make_task(zombie_timeout=600.0)
    b = make_task(zombie_timeout=600.0)
    ids = a.push_many([b"%d" % i for i in range(4)])
    assert b.reaper.run_once().recovered == 0
    a.redis.delete(a.transport.queue_key, a.transport.epoch_key)
    epoch = a.transport.ensure_epoch()[0]  # a's reaper sees the loss...
    lock = a.transport._recovery_base + epoch.decode()
    assert a.redis.set(lock, b"running:a", nx=True, px=1500)  # ...takes the lock, dies
    assert b.reaper.run_once().recovered == 0  # a holds the lock: still owed
    # old code: b would never try again
    wait_for(lambda: b.reaper.run_once().recovered == len(ids), message="the takeover")
    assert queued(b) == Counter({(i, 0): 1 for i in ids})
    assert b.reaper.run_once().recovered == 0


# -- pops are sent once ------------------------------------------------------------------


@pytest.mark.parametrize("priorities", [None, ["default"]], ids=["LMPOP", "LPOP"])
def test_pop_whose_reply_is_lost_is_not_sent_again(
    make_task: TaskFactory, redis_url: str, priorities: list[str] | None
) -> None:
    proxy = TcpProxy.to(redis_url).open()
    try:
        clock = Clock()
        extra = {} if priorities is None else {"priorities": priorities}
        task = make_task(redis=proxy.url(redis_url), clock=clock, zombie_timeout=5.0, **extra)
        ids = task.push_many([b"a", b"b", b"c"])
        proxy.lose_next_reply()
        # Old code: redis-py popped again on a new connection and returned nothing,
        # silently; the three messages were gone.
        with pytest.raises(TransportUnavailableError, match="sent once"):
            task.transport.pop(10, timeout=0)
        assert task.transport.depth() == 0  # the pop ran on the server
        clock.advance(6)
        assert task.reaper.sweep() == len(ids)  # re-sent from the ledger
        assert {i for i, _ in queued(task)} == set(ids)
    finally:
        proxy.stop()


# -- a Redis that went back in time ------------------------------------------------------


@pytest.mark.parametrize("how", ["restore", "lagging replica"])
def test_redis_back_in_time_redispatches_todo_jobs(
    make_task: TaskFactory,
    servers: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo")
    primary = servers()
    proxy = TcpProxy("127.0.0.1", primary.port).open()
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        task = make_task(redis=url, zombie_timeout=600.0)
        old = task.push_many([b"old", b"old"])
        assert task.reaper.run_once().recovered == 0
        client = admin(primary)
        if how == "restore":
            client.save()  # the backup
        else:
            replica = servers()
            rclient = admin(replica)
            rclient.replicaof("127.0.0.1", primary.port)
            wait_for(lambda: rclient.info("replication")["master_link_status"] == "up")
            wait_for(lambda: rclient.dbsize() == client.dbsize() > 0)
            rclient.replicaof("no", "one")  # stops following: it lags from here on
        new = task.push_many([b"new", b"new", b"new"])
        assert task.reaper.run_once().recovered == 0
        assert task.reaper.run_once().recovered == 0
        if how == "restore":
            primary.restart()  # loads the backup: same epoch token, old queue
        else:  # failover to the lagging replica
            proxy.close()
            proxy.target = ("127.0.0.1", replica.port)
            proxy.open()
        assert {i for i, _ in queued(task)} == set(old)  # the new messages are gone
        report = task.reaper.run_once()  # old code: same token, nothing noticed
        assert report.recovered == len(old) + len(new)
        assert set(new) <= {i for i, _ in queued(task)}
        assert any("went back in time" in r.getMessage() for r in caplog.records)
        assert task.reaper.run_once().recovered == 0
    finally:
        proxy.stop()


# -- the eviction storm ------------------------------------------------------------------


def test_repeated_epoch_loss_redispatches_once_per_window(
    make_task: TaskFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meepo")
    clock = Clock()
    task = make_task(clock=clock, zombie_timeout=30.0)
    ids = task.push_many([b"%d" % i for i in range(3)])
    assert task.reaper.run_once().recovered == 0
    task.redis.delete(task.transport.epoch_key)  # evicted
    assert task.reaper.run_once().recovered == len(ids)
    task.redis.delete(task.transport.epoch_key)  # evicted again at once
    assert task.reaper.run_once().recovered == 0  # old code: every job re-sent again
    assert any("waits for the window" in r.getMessage() for r in caplog.records)
    clock.advance(29)
    assert task.reaper.run_once().recovered == 0
    clock.advance(2)
    assert task.reaper.run_once().recovered == len(ids)  # owed, run after the window
    assert task.reaper.run_once().recovered == 0


# -- a silent Redis holds no reaper step for long ------------------------------------------


def test_silent_redis_does_not_hold_the_reaper(make_task: TaskFactory, redis_url: str) -> None:
    proxy = TcpProxy.to(redis_url).open()
    try:
        clock = Clock()
        task = make_task(redis=proxy.url(redis_url), clock=clock, zombie_timeout=3.0)
        (job_id,) = task.push_many([b"claimed by a dead worker"])
        claim_and_die(task, [job_id], lease=3.0)
        assert task.reaper.run_once(reap=True) == ReapReport()
        proxy.blackhole()  # a partition: no reset, nothing answers
        clock.advance(4)
        # Each Redis step gives up after about a third of the 3 s lease (1 s per attempt,
        # the floor); old code: 30 s per attempt, three attempts per step.
        report = in_thread(lambda: task.reaper.run_once(reap=True), timeout=25)
        assert report.requeued == 1
        assert {"epoch", "sweep"} <= set(report.errors)
        assert record(task, job_id).status is Status.TODO
    finally:
        proxy.stop()
