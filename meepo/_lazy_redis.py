"""Keep ``redis.asyncio`` out of a process that only uses sync redis-py.

redis-py (from 6) runs ``from redis import asyncio`` in ``redis/__init__.py``, which
loads the whole asyncio client, cluster and sentinel (~30 ms of a worker's start-up,
and memory) although meepo's code is sync. Before the first ``import redis``,
:func:`defer` puts a placeholder package in ``sys.modules["redis.asyncio"]``: its
submodules import as usual (redis-py's sync code needs a few of them), and the
package's own ``__init__`` runs in the placeholder, making it the real
``redis.asyncio``, the first time anything reads one of its attributes other than a
submodule (``from
redis.asyncio import Redis``, ``redis.asyncio.Redis``, ``import redis.asyncio as r;
r.Redis``). Code that uses redis.asyncio sees no difference but the moment it loads.

Importing this module installs it (``meepo/__init__.py`` imports it first).

Nothing happens when redis is already imported, when its asyncio package is not where
it is expected, or with ``MEEPO_EAGER_REDIS_ASYNCIO=1`` set.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from typing import Any

NAME = "redis.asyncio"
#: Set to 1 to import redis.asyncio eagerly, as redis-py does.
EAGER_ENV = "MEEPO_EAGER_REDIS_ASYNCIO"


class _Deferred(types.ModuleType):
    """``redis.asyncio`` until one of its attributes is read; then the module itself."""

    def __getattr__(self, name: str) -> Any:
        state: dict[str, Any] = self.__dict__
        if not state.get("_meepo_loaded") and _submodule(name, state["__path__"]):
            # ``from redis.asyncio import <submodule>`` (redis-py's sync code does it):
            # the import system imports it on this AttributeError, the package stays
            # deferred.
            raise AttributeError(name)
        with _lock:
            if not state.get("_meepo_loaded") and not state.get("_meepo_loading"):
                state["_meepo_loading"] = True
                try:
                    loader = state["__spec__"].loader
                    loader.exec_module(self)
                    state["_meepo_loaded"] = True
                finally:
                    state["_meepo_loading"] = False
        try:
            return state[name]
        except KeyError:
            raise AttributeError(f"module {NAME!r} has no attribute {name!r}") from None


_lock = threading.RLock()


def _submodule(name: str, path: list[str]) -> bool:
    return (
        not name.startswith("__")
        and importlib.machinery.PathFinder.find_spec(f"{NAME}.{name}", path) is not None
    )


def defer() -> bool:
    """Install the placeholder; whether it was installed."""
    if os.environ.get(EAGER_ENV) == "1" or "redis" in sys.modules or NAME in sys.modules:
        return False
    try:
        top = importlib.util.find_spec("redis")  # a top-level spec: nothing is imported
    except (ImportError, ValueError):
        return False
    if top is None or not top.submodule_search_locations:
        return False
    for base in top.submodule_search_locations:
        init = os.path.join(base, "asyncio", "__init__.py")
        if os.path.isfile(init):
            break
    else:
        return False
    location = os.path.dirname(init)
    loader = importlib.machinery.SourceFileLoader(NAME, init)
    spec = importlib.util.spec_from_file_location(
        NAME, init, loader=loader, submodule_search_locations=[location]
    )
    if spec is None:
        return False
    module = _Deferred(NAME)
    module.__spec__ = spec
    module.__loader__ = loader
    module.__file__ = init
    module.__path__ = [location]
    module.__package__ = NAME
    sys.modules[NAME] = module
    return True


defer()
