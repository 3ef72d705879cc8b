"""Names, URLs and defaults. Pure functions: nothing here talks to a server."""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import DEFAULT_PRIORITY, Status

#: Task ids go into a SQL column and into Redis key hash tags.
TASK_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: Table names leave room for the suffixes meepo derives from them (``_version``,
#: ``_schedules``) under PostgreSQL's 63-byte identifier limit.
TABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
#: Redis key prefixes: no braces (they would break the ``{task_id}`` hash tag).
PREFIX_RE = re.compile(r"[A-Za-z0-9_.:\-]{0,64}")

#: Priority names go into Redis key names.
PRIORITY_RE = re.compile(r"[A-Za-z0-9_\-]{1,32}")
DEFAULT_PRIORITIES = ("high", DEFAULT_PRIORITY, "low")
#: Mel's default: the waits before the 1st, 2nd, 3rd and later retries.
DEFAULT_RETRY_BACKOFF = (2.0, 4.0, 8.0, 16.0)
#: The longest wait an exponential retry_backoff grows to.
MAX_BACKOFF = 3600.0
#: Unique job keys: the column is VARCHAR(255).
MAX_KEY_LENGTH = 255

DEFAULT_TABLE = "meepo_jobs"
DEFAULT_PREFIX = "meepo:"
DB_ENV = "MEEPO_DB_URL"
REDIS_ENV = "MEEPO_REDIS_URL"
HOME_ENV = "MEEPO_HOME"


def check_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id):
        raise ConfigError(
            f"invalid task id {task_id!r}: use 1 to 64 characters from A-Z a-z 0-9 _ . -"
        )
    return task_id


def check_table_name(name: object) -> str:
    if not isinstance(name, str) or not TABLE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid table name {name!r}: use a letter or _ then up to 39 of A-Z a-z 0-9 _"
        )
    return name


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"invalid list name prefix {prefix!r}: use up to 64 of A-Z a-z 0-9 _ . : -"
        )
    return prefix


def default_prefix(table: str) -> str:
    """The Redis key prefix of a task that sets none: ``meepo:`` on the default table,
    ``meepo:<table>:`` on a table of its own (same task id, different queues)."""
    return DEFAULT_PREFIX if table == DEFAULT_TABLE else f"{DEFAULT_PREFIX}{table}:"


def seconds(value: float | int | timedelta, name: str, *, allow_zero: bool = False) -> float:
    """A duration option as float seconds; accepts a number or a timedelta."""
    if isinstance(value, timedelta):
        out = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    else:
        raise ConfigError(f"{name} must be seconds (a number) or a timedelta, not {value!r}")
    if out < 0 or (out == 0 and not allow_zero) or out != out:
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return out


def check_priorities(value: object) -> tuple[str, ...]:
    """A task's priority queues, highest first: a non-empty sequence of distinct names."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"priorities must be a non-empty list of names, highest first, not {value!r}"
        )
    out: list[str] = []
    for p in value:
        if not isinstance(p, str) or not PRIORITY_RE.fullmatch(p):
            raise ConfigError(
                f"invalid priority {p!r}: use 1 to 32 characters from A-Z a-z 0-9 _ -"
            )
        if p in out:
            raise ConfigError(f"priority {p!r} is listed twice in {list(value)!r}")
        out.append(p)
    return tuple(out)


def check_priority(value: object, priorities: Sequence[str]) -> str:
    if value not in priorities:
        raise ValueError(
            f"unknown priority {value!r}: this task's priorities are {', '.join(priorities)}"
        )
    return str(value)


def retry_policy(value: object) -> Callable[[int], float] | None:
    """``retry_backoff`` as a function of the failure count (1 for the first retry).

    * a list of seconds: the n-th retry waits the n-th entry (the last one repeats);
    * a number of seconds ``b``: exponential backoff with jitter, the n-th retry waits
      between half and all of ``b * 2**(n-1)`` (capped at an hour);
    * a callable ``(failed_times) -> seconds``;
    * ``0``, ``None`` or an empty list: retry at once.
    """
    if value is None:
        return None
    if callable(value):
        func: Callable[[int], float] = value
        return func
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        base = float(value)
        if not math.isfinite(base) or base < 0:
            raise ConfigError(f"retry_backoff must be non-negative seconds, not {value!r}")
        if base == 0:
            return None
        return lambda n: _jittered(min(MAX_BACKOFF, base * 2.0 ** min(n - 1, 62)))
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        waits: list[float] = []
        for w in value:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ConfigError(
                    f"retry_backoff entries must be non-negative seconds, not {w!r} in "
                    f"{list(value)!r}"
                )
            waits.append(float(w))
        if not waits:
            return None
        return lambda n: waits[min(max(n, 1), len(waits)) - 1]
    raise ConfigError(
        "retry_backoff must be a list of seconds, a number of seconds (exponential "
        f"backoff) or a callable (failed_times) -> seconds, not {value!r}"
    )


def _jittered(wait: float) -> float:
    return wait / 2 + random.uniform(0, wait / 2)


def due_time(
    now: datetime, delay: float | int | timedelta | None, run_at: datetime | None
) -> datetime | None:
    """When a pushed job is due: ``delay`` seconds from ``now`` or at ``run_at`` (an aware
    datetime); None means now. A negative delay or a past ``run_at`` is due now."""
    if delay is not None and run_at is not None:
        raise ValueError("pass delay= or run_at=, not both")
    if run_at is not None:
        if not isinstance(run_at, datetime):
            raise TypeError(f"run_at must be a datetime, not {type(run_at).__name__}")
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise ValueError(
                f"run_at must be an aware datetime (e.g. with tzinfo=timezone.utc), not "
                f"the naive {run_at.isoformat()}"
            )
        return run_at
    if delay is None:
        return None
    if isinstance(delay, timedelta):
        secs = delay.total_seconds()
    elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
        secs = float(delay)
    else:
        raise TypeError(f"delay must be seconds (a number) or a timedelta, not {delay!r}")
    if not math.isfinite(secs):
        raise ValueError(f"delay must be a finite number of seconds, not {delay!r}")
    return now + timedelta(seconds=secs)


def check_key(key: object, unique_for: object) -> tuple[str | None, float]:
    """A unique job key and how long it stays reserved after its job finished."""
    if key is None:
        if unique_for is not None:
            raise ValueError("unique_for= needs a key=")
        return None, 0.0
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"key must be a non-empty string of at most {MAX_KEY_LENGTH} characters, not {key!r}"
        )
    if unique_for is None:
        return key, 0.0
    if isinstance(unique_for, timedelta):
        hold = unique_for.total_seconds()
    elif isinstance(unique_for, (int, float)) and not isinstance(unique_for, bool):
        hold = float(unique_for)
    else:
        raise TypeError(f"unique_for must be seconds or a timedelta, not {unique_for!r}")
    if not math.isfinite(hold) or hold < 0:
        raise ValueError(f"unique_for must be non-negative seconds, not {unique_for!r}")
    return key, hold


def positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    return value


# The password runs to the last "@" of the URL's authority (redis-py accepts a raw "@"
# inside a password), so the greedy match stops only at "/" or white space.
_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^/\s]*)@")
#: Query parameters that carry a password (libpq, PyMySQL and redis-py accept
#: ``?password=``; PyMySQL also ``passwd``), matched case-insensitively.
PASSWORD_PARAMS = ("password", "passwd", "pass", "pwd")
_PARAM_RE = re.compile(
    r"(?P<head>[?&](?:" + "|".join(PASSWORD_PARAMS) + r")=)(?P<pw>[^&#\s'\"]*)", re.IGNORECASE
)


def mask_url(text: str) -> str:
    """Replace every password in ``text`` with ``***``: the password of every URL's
    userinfo (``scheme://user:PASSWORD@host``) and the value of every ``password``,
    ``passwd``, ``pass`` or ``pwd`` query parameter (any case), for SQL and Redis URLs
    alike. Every URL meepo shows (reprs, errors, log lines) goes through it."""
    text = _PASSWORD_RE.sub(lambda m: f"{m.group('head')}***@", text)
    return _PARAM_RE.sub(lambda m: f"{m.group('head')}***", text)


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password (in its userinfo or its query string)."""
    return mask_url(url) != url


def read_secret_file(path: str, what: str) -> str:
    """The content of a URL or password file, without its trailing line break.

    ``what`` names the option or variable the path came from, for the errors: a missing,
    unreadable or empty file is a :class:`ConfigError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file {path!r}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path!r} is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path!r}: {exc}") from None
    value = text.rstrip("\r\n")
    if not value.strip():
        raise ConfigError(f"{what}: the file {path!r} is empty")
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{what}: the file {path!r} must hold one line, not several")
    return value


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its userinfo password (replacing any there or in
    its query string); for SQLAlchemy and Redis URLs."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"invalid URL {mask_url(url)!r}: {exc}") from None
    if parts.scheme.startswith("sqlite"):
        raise ConfigError(f"a SQLite URL takes no password: {mask_url(url)!r}")
    if not parts.scheme or not parts.netloc:
        raise ConfigError(f"invalid URL {mask_url(url)!r}: expected scheme://host/...")
    userinfo, _, hostpart = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]  # kept as written (already percent-encoded)
    netloc = f"{user}:{quote(password, safe='')}@{hostpart}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in PASSWORD_PARAMS for k, _v in pairs):
        query = urlencode([(k, v) for k, v in pairs if k.lower() not in PASSWORD_PARAMS])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def home_dir() -> Path:
    """Where the embedded defaults keep their files (``MEEPO_HOME`` or ``./.meepo``)."""
    return Path(os.environ.get(HOME_ENV) or ".meepo").absolute()


def env_url(env: str) -> str | None:
    """A URL from the environment: ``$<env>``, else the content of the file named by
    ``$<env>_FILE``; then the password in the file named by ``$<env minus _URL>_PASSWORD_FILE``
    (``MEEPO_DB_PASSWORD_FILE``, ``MEEPO_REDIS_PASSWORD_FILE``), if set. None if neither
    the URL nor its file is set."""
    url = os.environ.get(env) or None
    if url is None:
        path = os.environ.get(env + "_FILE")
        if path:
            url = read_secret_file(path, f"${env}_FILE")
    pw_env = password_file_env(env)
    pw_path = os.environ.get(pw_env)
    if pw_path:
        if url is None:
            raise ConfigError(f"${pw_env} is set but there is no URL to use it with (${env})")
        url = with_password(url, read_secret_file(pw_path, f"${pw_env}"))
    return url


def password_file_env(env: str) -> str:
    """``MEEPO_DB_URL`` -> ``MEEPO_DB_PASSWORD_FILE``."""
    return env.removesuffix("_URL") + "_PASSWORD_FILE"


def default_db_url() -> str:
    """``MEEPO_DB_URL`` (or ``MEEPO_DB_URL_FILE``, see :func:`env_url`), else the
    embedded SQLite file."""
    url = env_url(DB_ENV)
    if url:
        return url
    return f"sqlite:///{home_dir() / 'meepo.sqlite3'}"


def default_redis_url() -> str | None:
    """``MEEPO_REDIS_URL`` (or ``MEEPO_REDIS_URL_FILE``, see :func:`env_url`), or None,
    meaning: use the embedded Redis server."""
    return env_url(REDIS_ENV)


#: The default ``prefetch`` is this many claims per executor thread: claims are made in
#: batches of up to ``parallel_num + prefetch``, and short jobs drain 1.5-2x faster with
#: 4 than with 1 (benchmarks/, docs/performance.md). Long jobs want ``prefetch=0``.
PREFETCH_PER_THREAD = 4
#: With the default (automatic) prefetch, a consumer whose handlers are short claims
#: further ahead: up to about this many seconds of work per executor thread, measured
#: from the handlers' recent run times, and at most AUTO_PREFETCH_MAX_PER_THREAD claims
#: per thread. Long handlers stay at PREFETCH_PER_THREAD.
AUTO_PREFETCH_SECONDS = 0.25
AUTO_PREFETCH_MAX_PER_THREAD = 30


@dataclass(frozen=True)
class Options:
    """A task's validated runtime options (durations in float seconds)."""

    parallel_num: int = 10
    max_failed_times: int = 3
    auto_commit: bool = True
    zombie_dst_status: Status = Status.TODO
    zombie_period: float = 20.0
    #: ``Task(zombie_timeout=)``: how long after a todo job is due its message may be
    #: lost before the dispatch sweep sends it again (the row's dispatch_deadline), and
    #: the default lease. One name inside meepo (docs/design.md, "Timeouts").
    redispatch_timeout: float = 20.0
    zombie_limit: int = 1000
    lease: float = 20.0
    prefetch: int = 40  # PREFETCH_PER_THREAD x parallel_num unless given
    prefetch_auto: bool = True  # not given: may claim further ahead for short handlers
    shutdown_grace: float = 30.0
    poll_interval: float = 0.5
    max_payload_bytes: int = 1024 * 1024
    priorities: tuple[str, ...] = DEFAULT_PRIORITIES
    promote_interval: float = 0.05
    job_timeout: float | None = None  # seconds a handler may run; None: no limit
    store_results: bool = False  # the handler's return value goes into the ledger
    max_result_bytes: int = 64 * 1024  # a larger result fails the job (not retried)
    #: The task's serializer (meepo.serializers; None: bytes).
    serializer: Any = None

    @property
    def zombie_timeout(self) -> float:
        """:attr:`redispatch_timeout` under the name of ``Task``'s parameter."""
        return self.redispatch_timeout

    @property
    def heartbeat_interval(self) -> float:
        """Leases are renewed three times per lease: two renewals may fail in a row."""
        return self.lease / 3
