"""The runtime: consumers, heartbeats, reaper and promoter, each a small threaded service."""

from .consumer import Consumer, Counters, Handler
from .promoter import Promoter
from .reaper import Reaper, ReapReport

__all__ = ["Consumer", "Counters", "Handler", "Promoter", "ReapReport", "Reaper"]
