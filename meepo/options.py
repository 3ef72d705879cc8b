"""``TaskOptions``: every parameter of ``Task`` checked before anything is wired.

``TaskOptions.from_kwargs`` takes ``Task``'s parameters (all but the connections, ``db``
and ``redis``, which :mod:`meepo.connect` checks) and returns them validated and
normalised: durations as float seconds, statuses and priorities parsed, defaults derived
(``lease`` from ``zombie_timeout``, ``prefetch`` from ``parallel_num``, the Redis prefix
from the table). Every bad value is a :class:`~meepo.errors.ConfigError` (a
``ValueError``) naming the parameter, raised before any I/O. ``Task`` then only wires.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from . import config
from .config import DEFAULT_TABLE, Options
from .errors import ConfigError
from .middleware import Middleware
from .records import DEFAULT_PRIORITY, Job, Status
from .runtime.cleaner import check_retention
from .serializers import Serializer, serializer_for

#: The largest ``max_result_bytes`` (the result column is a MEDIUMBLOB on MySQL).
MAX_RESULT_BYTES = 16 * 1024 * 1024 - 1

JobFunc = Callable[[Job], Any]


@dataclass(frozen=True)
class TaskOptions:
    """A Task's parameters, validated (see :meth:`from_kwargs`)."""

    task_id: str
    job_func: JobFunc | None
    #: What the runtime services read (consumer, reaper, promoter).
    runtime: Options
    table_name: str
    list_name_prefix: str
    default_priority: str
    retry_backoff: Callable[[int], float] | None
    init_db: bool
    clock: Callable[[], datetime] | None
    middleware: tuple[Middleware, ...]
    #: Seconds to keep finished jobs, per status (None: keep the stored policy).
    retention: dict[Status, float] | None
    #: How payloads and results become bytes (meepo.serializers).
    serializer: Serializer
    #: Push runs the jobs in the pushing thread, with no Redis (meepo.testing).
    inline: bool = False

    @classmethod
    def from_kwargs(
        cls,
        task_id: str,
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
    ) -> TaskOptions:
        """Check ``Task``'s parameters; a ConfigError names the first bad one."""
        task_id = config.check_task_id(task_id)
        if job_func is not None and not callable(job_func):
            raise ConfigError(f"job_func must be callable, not {type(job_func).__name__}")
        try:
            dst = Status.parse(zombie_dst_status)
        except ValueError as exc:
            raise ConfigError(f"zombie_dst_status: {exc}") from None
        if dst is Status.DOING:
            raise ConfigError("zombie_dst_status must be todo, done or failed, not doing")
        parallel = config.positive_int(parallel_num, "parallel_num")
        redispatch_timeout = config.seconds(zombie_timeout, "zombie_timeout")
        prios = config.check_priorities(priorities)
        if default_priority is None:
            default_priority = DEFAULT_PRIORITY if DEFAULT_PRIORITY in prios else prios[0]
        try:
            default_priority = config.check_priority(default_priority, prios)
        except ValueError as exc:
            raise ConfigError(f"default_priority: {exc}") from None
        backoff = config.retry_policy(retry_backoff)
        codec = serializer_for(serializer)
        result_limit = config.positive_int(max_result_bytes, "max_result_bytes")
        if result_limit > MAX_RESULT_BYTES:
            raise ConfigError(
                f"max_result_bytes must be at most {MAX_RESULT_BYTES} (16 MiB - 1), "
                f"not {result_limit}"
            )
        if clock is not None and not callable(clock):
            raise ConfigError(f"clock must be callable, not {type(clock).__name__}")
        runtime = Options(
            parallel_num=parallel,
            max_failed_times=config.positive_int(max_failed_times, "max_failed_times"),
            auto_commit=bool(auto_commit),
            zombie_dst_status=dst,
            zombie_period=config.seconds(zombie_period, "zombie_period"),
            redispatch_timeout=redispatch_timeout,
            zombie_limit=config.positive_int(zombie_limit, "zombie_limit"),
            lease=redispatch_timeout if lease is None else config.seconds(lease, "lease"),
            prefetch=(
                config.PREFETCH_PER_THREAD * parallel
                if prefetch is None
                else _non_negative(prefetch, "prefetch")
            ),
            prefetch_auto=prefetch is None,
            shutdown_grace=config.seconds(shutdown_grace, "shutdown_grace", allow_zero=True),
            poll_interval=config.seconds(poll_interval, "poll_interval"),
            max_payload_bytes=config.positive_int(max_payload_bytes, "max_payload_bytes"),
            priorities=prios,
            promote_interval=config.seconds(promote_interval, "promote_interval"),
            job_timeout=None if job_timeout is None else config.seconds(job_timeout, "job_timeout"),
            store_results=bool(store_results),
            max_result_bytes=result_limit,
            serializer=codec,
        )
        table = _named(table_name, "table_name", config.check_table_name, DEFAULT_TABLE)
        prefix = _named(
            list_name_prefix, "list_name_prefix", config.check_prefix, config.default_prefix(table)
        )
        return cls(
            task_id=task_id,
            job_func=job_func,
            runtime=runtime,
            table_name=table,
            list_name_prefix=prefix,
            default_priority=default_priority,
            retry_backoff=backoff,
            init_db=bool(init_db),
            clock=clock,
            middleware=_middleware(middleware),
            inline=bool(inline),
            retention=check_retention(retention),
            serializer=codec,
        )


def parameters() -> dict[str, Any]:
    """The keyword parameters of :meth:`TaskOptions.from_kwargs` and their defaults
    (``Task.__init__`` repeats them; a test keeps the two equal)."""
    sig = inspect.signature(TaskOptions.from_kwargs)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _named(value: str | None, name: str, check: Callable[[object], str], default: str) -> str:
    """A table name or a key prefix: None means the default; an empty string is an
    error (it used to mean the default too, silently)."""
    if value is None:
        return default
    if value == "":
        raise ConfigError(f"{name} must not be empty: leave it out for the default, {default!r}")
    try:
        return check(value)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _non_negative(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def _middleware(value: object) -> tuple[Middleware, ...]:
    if isinstance(value, Middleware):
        raise ConfigError("middleware must be a list of Middleware instances, not one instance")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"middleware must be a list of Middleware instances, not {value!r}")
    out: list[Middleware] = []
    for i, m in enumerate(value):
        if isinstance(m, type) and issubclass(m, Middleware):
            raise ConfigError(
                f"middleware #{i} is the class {m.__name__}, not an instance: pass {m.__name__}()"
            )
        if not isinstance(m, Middleware):
            raise ConfigError(
                f"middleware #{i} must be a meepo.Middleware instance, not {type(m).__name__}"
            )
        out.append(m)
    return tuple(out)
