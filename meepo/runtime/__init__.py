"""The runtime: consumers, heartbeats and the reaper, each a small threaded service."""

from .consumer import Consumer, Counters, Handler
from .reaper import Reaper, ReapReport

__all__ = ["Consumer", "Counters", "Handler", "ReapReport", "Reaper"]
