"""Names, URLs and defaults. Pure functions: nothing here talks to a server."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .errors import ConfigError
from .records import Status

#: Task ids go into a SQL column and into Redis key hash tags.
TASK_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: Table names leave room for the suffixes meepo derives from them (``_version``,
#: ``_schedules``) under PostgreSQL's 63-byte identifier limit.
TABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
#: Redis key prefixes: no braces (they would break the ``{task_id}`` hash tag).
PREFIX_RE = re.compile(r"[A-Za-z0-9_.:\-]{0,64}")

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


def positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    return value


# The password runs to the last "@" of the URL's authority (redis-py accepts a raw "@"
# inside a password), so the greedy match stops only at "/" or white space.
_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^/\s]*)@")


def mask_url(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    return _PASSWORD_RE.sub(lambda m: f"{m.group('head')}***@", text)


def home_dir() -> Path:
    """Where the embedded defaults keep their files (``MEEPO_HOME`` or ``./.meepo``)."""
    return Path(os.environ.get(HOME_ENV) or ".meepo").absolute()


def default_db_url() -> str:
    url = os.environ.get(DB_ENV)
    if url:
        return url
    return f"sqlite:///{home_dir() / 'meepo.sqlite3'}"


def default_redis_url() -> str | None:
    """``MEEPO_REDIS_URL`` or None, meaning: use the embedded Redis server."""
    return os.environ.get(REDIS_ENV) or None


#: The default ``prefetch`` is this many claims per executor thread: claims are made in
#: batches of up to ``parallel_num + prefetch``, and short jobs drain 1.5-2x faster with
#: 4 than with 1 (benchmarks/, README "Performance"). Long jobs want ``prefetch=0``.
PREFETCH_PER_THREAD = 4


@dataclass(frozen=True)
class Options:
    """A task's validated runtime options (durations in float seconds)."""

    parallel_num: int = 10
    max_failed_times: int = 3
    auto_commit: bool = True
    zombie_dst_status: Status = Status.TODO
    zombie_period: float = 20.0
    zombie_timeout: float = 20.0
    zombie_limit: int = 1000
    lease: float = 20.0
    prefetch: int = 40  # PREFETCH_PER_THREAD x parallel_num unless given
    shutdown_grace: float = 30.0
    poll_interval: float = 0.5
    max_payload_bytes: int = 1024 * 1024

    @property
    def heartbeat_interval(self) -> float:
        """Leases are renewed three times per lease: two renewals may fail in a row."""
        return self.lease / 3
