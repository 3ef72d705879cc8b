"""What every ``meepo`` command shares: the connection options (accepted before or after
the command's name), the parameter types, logging to stderr and the one-line errors."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import click

from ..config import (
    DB_ENV,
    REDIS_ENV,
    env_url,
    has_password,
    mask_url,
    password_file_env,
    read_secret_file,
    with_password,
)
from ..records import Status

PROG = "meepo"
REPUSH_STATUSES = (Status.FAILED, Status.TODO, Status.DOING, Status.CANCELLED)
#: The statuses ``meepo cancel --status`` takes: the jobs that have not finished.
CANCEL_STATUSES = (Status.TODO, Status.DOING)
#: ``--log-level`` names, quietest last; ``-v`` is ``--log-level info``.
LOG_LEVELS = ("debug", "info", "warning", "error")

F = TypeVar("F", bound=Callable[..., Any])


class UsageError(Exception):
    """Bad input on the command line: exit status 2."""


# -- parameter types --------------------------------------------------------------------


class _Type(click.ParamType):  # type: ignore[type-arg]
    """A click type from a function raising ValueError with the message to show."""

    def __init__(self, name: str, convert: Callable[[str], Any]) -> None:
        self.name = name
        self._convert = convert

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _job_id(text: str) -> int:
    if not re.fullmatch(r"\d{1,19}", text.strip()) or int(text) < 1:
        raise ValueError(f"invalid job id {text!r}: expected a positive integer")
    return int(text)


def _positive(text: str) -> int:
    if not re.fullmatch(r"\d{1,9}", text.strip()) or int(text) < 1:
        raise ValueError(f"expected a positive integer, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"expected a positive number of seconds, not {text!r}")
    return value


def _one_of(statuses: tuple[Status, ...]) -> Callable[[str], Status]:
    def parse(text: str) -> Status:
        for status in statuses:
            if text.strip().lower() == status.value:
                return status
        choices = ", ".join(s.value for s in statuses)
        raise ValueError(f"unknown status {text!r}: expected one of {choices}")

    return parse


_repush_status = _one_of(REPUSH_STATUSES)
_cancel_status = _one_of(CANCEL_STATUSES)


_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC) or an age ago: ``90s``, ``30m``, ``2h``, ``7d``."""
    now = now or datetime.now(timezone.utc)
    value = text.strip()
    m = _AGE_RE.fullmatch(value.lower())
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _AGE_UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in "zZ" else value)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use ISO 8601 (2024-05-01T12:00:00Z) or an age such as "
            "90s, 30m, 2h, 7d"
        ) from None
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _schedule_name(text: str) -> str:
    from ..schedule import check_name

    return check_name(text)


JOB_ID = _Type("ID", _job_id)
POSITIVE = _Type("N", _positive)
SECONDS = _Type("S", _seconds)
REPUSH_STATUS = _Type("STATUS", _repush_status)
CANCEL_STATUS = _Type("STATUS", _cancel_status)
TIME = _Type("T", parse_time)
SCHEDULE_NAME = _Type("NAME", _schedule_name)


# -- options every command takes --------------------------------------------------------

#: Where the connection options of the group and of the command meet (the command's win).
_META = "meepo.options"


def given(ctx: click.Context) -> dict[str, Any]:
    """The common options given anywhere on the command line (None: not given)."""
    found: dict[str, Any] = ctx.find_root().meta.setdefault(_META, {})
    return found


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None and value is not False and param.name:
        opts = given(ctx)
        opts[param.name] = value
        if param.name in ("verbose", "log_level"):
            logging.getLogger("meepo").setLevel(log_level(opts))


def common_options(f: F) -> F:
    """``--db``, ``--redis``, their files, ``-v`` and ``--log-level``: on the group and on
    every command, so they go before or after the command's name."""
    opts: list[Callable[[F], F]] = [
        click.option(
            "--db",
            metavar="URL",
            expose_value=False,
            callback=_store,
            help=f"Ledger database URL (default: ${DB_ENV}, else the embedded SQLite file).",
        ),
        click.option(
            "--redis",
            metavar="URL",
            expose_value=False,
            callback=_store,
            help=f"Redis URL (default: ${REDIS_ENV}, else the embedded Redis server).",
        ),
    ]
    for name, env in (("db", DB_ENV), ("redis", REDIS_ENV)):
        opts.append(
            click.option(
                f"--{name}-file",
                metavar="PATH",
                expose_value=False,
                callback=_store,
                help=f"Read the --{name} URL from this file (default: ${env}_FILE).",
            )
        )
        opts.append(
            click.option(
                f"--{name}-password-file",
                metavar="PATH",
                expose_value=False,
                callback=_store,
                help=f"Read the password of the --{name} URL from this file "
                f"(default: ${password_file_env(env)}).",
            )
        )
    opts.append(
        click.option(
            "-v",
            "--verbose",
            is_flag=True,
            default=False,
            expose_value=False,
            callback=_store,
            help="Short for --log-level info (a worker logs one line per job state change).",
        )
    )
    opts.append(
        click.option(
            "--log-level",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            expose_value=False,
            callback=_store,
            help="Log level of meepo's loggers on stderr (default: warning; a worker's start "
            "and shutdown lines show at every level but error).",
        )
    )
    for opt in reversed(opts):
        f = opt(f)
    return f


# -- connections ------------------------------------------------------------------------


def connections(ctx: click.Context) -> tuple[str | None, str | None]:
    """The database and Redis URLs from the options, their files and the environment
    (None: the embedded default)."""
    opts = given(ctx)
    if "_urls" not in opts:  # once: a password on argv is warned about once
        opts["_urls"] = (_connection(opts, "db", DB_ENV), _connection(opts, "redis", REDIS_ENV))
    urls: tuple[str | None, str | None] = opts["_urls"]
    return urls


def _connection(opts: dict[str, Any], name: str, env: str) -> str | None:
    flag = f"--{name}"
    url: str | None = opts.get(name)
    url_file: str | None = opts.get(f"{name}_file")
    pw_file: str | None = opts.get(f"{name}_password_file")
    if url is not None and url_file is not None:
        raise UsageError(f"give {flag} or {flag}-file, not both")
    if url is not None:
        if not url.strip():
            raise UsageError(f"{flag} needs a URL, not an empty string")
        if has_password(url):
            stderr(
                f"warning: the {flag} URL holds a password, which `ps` shows to every user "
                f"of this machine: use {flag}-password-file, {flag}-file or ${env} instead"
            )
    elif url_file is not None:
        url = read_secret_file(url_file, f"{flag}-file")
    elif pw_file is None:
        return env_url(env)  # with $..._PASSWORD_FILE, if set
    else:
        saved = os.environ.pop(password_file_env(env), None)
        try:
            url = env_url(env)
        finally:
            if saved is not None:
                os.environ[password_file_env(env)] = saved
    pw_env = password_file_env(env)
    if pw_file is not None:
        where = f"{flag}-password-file"
    elif os.environ.get(pw_env):
        pw_file, where = os.environ[pw_env], f"${pw_env}"
    else:
        return url
    if url is None:
        raise UsageError(
            f"{where} needs a URL to go with: {flag}, {flag}-file or ${env} "
            "(the embedded default takes no password)"
        )
    return with_password(url, read_secret_file(pw_file, where))


# -- output -----------------------------------------------------------------------------


def missing_sqlite_file(url: str) -> str | None:
    """The absolute path of the SQLite file a ledger URL names when that file does not
    exist yet (opening it would create it, and its directory), or None: a server, an
    in-memory database, or a file that is there. A bad URL is named first (the error of
    :func:`meepo.urls.check_db_url`). Read-only commands call it before they open
    anything: ``stats`` then shows an empty overview, the row queries exit 1."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from ..urls import check_db_url

    check_db_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # the engine names the problem
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:":
        return None
    if path.startswith("file:"):  # an SQLite URI filename
        path = path[len("file:") :].split("?", 1)[0]
        if not path or path == ":memory:":
            return None
    return None if os.path.exists(path) else os.path.abspath(path)


def stderr(message: str) -> None:
    """One line on stderr, prefixed ``meepo:``, passwords masked."""
    lines = [line.strip() for line in mask_url(message).splitlines() if line.strip()]
    sys.stderr.write(f"{PROG}: {lines[0] if lines else 'failed'}\n")
    sys.stderr.flush()


def fail(message: str, code: int) -> int:
    stderr(f"error: {message}")
    return code


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(mask_url(self.format(record)) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_handlers: list[logging.Handler] = []


def worker_format() -> None:
    """Switch the routed log lines to the worker's format."""
    for handler in _handlers:
        handler.setFormatter(logging.Formatter(WORKER_FORMAT))


def log_level(opts: dict[str, Any]) -> int:
    """The level ``--log-level`` or ``-v`` asked for (WARNING by default)."""
    name: str | None = opts.get("log_level")
    if name is not None:
        return int(getattr(logging, name.upper()))
    return logging.INFO if opts.get("verbose") else logging.WARNING


#: A worker's log lines carry the time and the logger; a command's are ``meepo: …``.
WORKER_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
COMMAND_FORMAT = f"{PROG}: %(levelname)s: %(message)s"


def route_logging() -> Callable[[], None]:
    """Route the ``meepo`` loggers to stderr (at WARNING until ``-v``/``--log-level``
    say otherwise) for the command's duration; returns the undo."""
    logger = logging.getLogger("meepo")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(COMMAND_FORMAT))
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False
    _handlers.append(handler)

    def restore() -> None:
        logger.removeHandler(handler)
        _handlers.remove(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate

    return restore


def describe(exc: Exception) -> str:
    """A driver or unexpected error as one line, naming where it came from."""
    from redis import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, SQLAlchemyError):
        return f"database error: {exc}"
    if isinstance(exc, RedisError):
        return f"Redis error: {exc}"
    if isinstance(exc, (RuntimeError, ImportError)) and str(exc):
        return str(exc)
    if isinstance(exc, LookupError) and str(exc):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
