"""The runtime: consumers, heartbeats, reaper, promoter and
scheduler, each a small threaded service."""

from .consumer import Consumer, Counters, Handler
from .promoter import Promoter
from .reaper import Reaper, ReapReport
from .scheduler import Scheduler

__all__ = ["Consumer", "Counters", "Handler", "Promoter", "ReapReport", "Reaper", "Scheduler"]
