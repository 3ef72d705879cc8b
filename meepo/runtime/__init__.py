"""The runtime: a worker process's services. A consumer (fetcher, executor, committer,
heartbeat, starter, watchdog) per task, and beside it the reaper, the promoter and the
scheduler; each a small threaded service (docs/runtime.md)."""

from .consumer import Consumer, Counters, Handler
from .executor import Executor, ThreadExecutor
from .promoter import Promoter
from .reaper import Reaper, ReapReport
from .scheduler import Scheduler

__all__ = [
    "Consumer",
    "Counters",
    "Executor",
    "Handler",
    "Promoter",
    "ReapReport",
    "Reaper",
    "Scheduler",
    "ThreadExecutor",
]
