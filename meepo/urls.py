"""Checking database and Redis URLs before anything connects: one line that names the
problem and the fix (:class:`~meepo.errors.ConfigError`), never a driver's traceback.

Checked, in order: a password with characters that must be percent-encoded (the
message never shows any part of it), an unknown scheme, an in-memory SQLite database,
a port that is not a number, and a missing driver (with the install line of *that*
database). A missing database on a server is reported when the first connection finds
it (:mod:`meepo.ledger.engine`)."""

from __future__ import annotations

import re

from .config import mask_url
from .errors import ConfigError

#: The distribution to install extras of (``pip install 'meepo-queue[postgres]'``).
DIST = "meepo-queue"

DB_SCHEMES = ("postgresql+psycopg://", "mysql+pymysql:// (MariaDB, MySQL)", "sqlite:///PATH")
_DB_BACKENDS = ("postgresql", "mysql", "mariadb", "sqlite")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")

_ENCODE_HINT = (
    'percent-encode it (python3 -c "import urllib.parse; print(urllib.parse.quote(input(), '
    "safe=''))\") or give it in a password file ({flag}-password-file, ${env}), where meepo "
    "encodes it"
)


def password_problem(url: str, what: str, flag: str, env: str) -> str | None:
    """Why the userinfo of ``url`` cannot be parsed as meant (a password holding ``@``,
    ``#``, ``/``, ``?`` or ``:`` unencoded), without any part of it; or None."""
    m = _SCHEME_RE.match(url)
    if m is None or url[m.end() : m.end() + 1] == "/":
        return None  # no authority (sqlite:///, unix:///path)
    rest = url[m.end() :]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    bad = False
    if "@" in authority:
        userinfo = authority.rpartition("@")[0]
        bad = "@" in userinfo or userinfo.count(":") > 1
    elif "@" in rest[len(authority) :] and ":" in authority:
        # "user:pa/ss@host": the authority seems to end inside the password
        bad = not authority.rpartition(":")[2].isdigit()
    if not bad:
        return None
    hint = _ENCODE_HINT.format(flag=flag, env=env)
    return (
        f"the password in the {what} URL holds a character that must be percent-encoded "
        f"(@ # / ? : are %40 %23 %2F %3F %3A): {hint}"
    )


def _port_problem(url: str, what: str) -> str | None:
    m = _SCHEME_RE.match(url)
    if m is None:
        return None
    authority = re.split(r"[/?#]", url[m.end() :], maxsplit=1)[0]
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):  # [IPv6]:port
        host, _, tail = hostport[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
    if port and not port.isdigit():
        return (
            f"the port of host {host!r} in the {what} URL is not a number: write "
            "HOST:PORT with digits (or leave the port out for the default)"
        )
    return None


def check_db_url(url: str) -> None:
    """Raise ConfigError naming the problem of a database URL (see the module)."""
    problem = password_problem(url, "database", "--db", "MEEPO_DB_PASSWORD_FILE")
    if problem:
        raise ConfigError(problem)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    m = _SCHEME_RE.match(url)
    backend = (m.group(1).split("+")[0].lower()) if m else ""
    if backend not in _DB_BACKENDS:
        shown = f"unknown scheme {m.group(0)!r}" if m else "no scheme://"
        raise ConfigError(
            f"invalid database URL {mask_url(url)!r}: {shown}; use " + ", ".join(DB_SCHEMES)
        )
    if backend == "sqlite":
        _check_sqlite(url)
    problem = _port_problem(url, "database")
    if problem:
        raise ConfigError(problem)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:  # before ArgumentError, its base class
        raise ConfigError(
            f"unknown driver {parsed.drivername!r} in the database URL: use "
            + ", ".join(DB_SCHEMES)
        ) from None
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"invalid database URL {mask_url(url)!r}: {exc}") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        raise ConfigError(_driver_hint(backend, parsed.drivername)) from None


def _driver_hint(backend: str, drivername: str) -> str:
    head = f"the driver of {drivername}:// is not installed"
    if backend == "postgresql":
        if drivername == "postgresql+psycopg":
            return f"{head}: pip install '{DIST}[postgres]' (psycopg 3)"
        return (
            f"{head}: meepo uses psycopg 3: write postgresql+psycopg:// and "
            f"pip install '{DIST}[postgres]'"
        )
    if backend in ("mysql", "mariadb"):
        return f"{head}: write mysql+pymysql:// (PyMySQL comes with meepo)"
    return f"{head}: use " + ", ".join(DB_SCHEMES)


def _check_sqlite(url: str) -> None:
    rest = url.split("://", 1)[1]
    path, _, query = rest.partition("?")
    memory = (
        path in ("", "/", "/:memory:")
        or path.startswith("/file::memory:")
        or "mode=memory" in query
    )
    if memory:
        raise ConfigError(
            f"{url.split('?')[0]!r} is an in-memory SQLite database: each connection has "
            "its own, so meepo's threads, workers and commands would not share the ledger; "
            "use a file: sqlite:///relative/path.sqlite3 or sqlite:////absolute/path.sqlite3"
        )


def check_redis_url(url: str) -> None:
    """Raise ConfigError naming the problem of a Redis URL (see the module)."""
    problem = password_problem(url, "Redis", "--redis", "MEEPO_REDIS_PASSWORD_FILE")
    if problem:
        raise ConfigError(problem)
    m = _SCHEME_RE.match(url)
    if m is None or m.group(0).lower() not in REDIS_SCHEMES:
        shown = f"unknown scheme {m.group(0)!r}" if m else "no scheme://"
        raise ConfigError(
            f"invalid Redis URL {mask_url(url)!r}: {shown}; use redis://HOST:PORT/DB, "
            "rediss://HOST:PORT/DB (TLS) or unix:///PATH/redis.sock"
        )
    problem = _port_problem(url, "Redis")
    if problem:
        raise ConfigError(problem)
