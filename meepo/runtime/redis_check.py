"""The Redis settings check now lives in :mod:`meepo.transport.settings` (the reaper
runs it through :meth:`meepo.dispatch.Dispatcher.check_transport`); kept as an alias."""

from ..transport.settings import _checked, check_redis_config

__all__ = ["_checked", "check_redis_config"]
