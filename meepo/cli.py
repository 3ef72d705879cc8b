"""The ``meepo`` command line: thin commands over :mod:`meepo.admin` and ``Task``.

::

    meepo worker MODULE:ATTR [--parallel N] [-v]
    meepo repush --id ID [ID ...] | --status failed|todo|doing [--since T] [--until T]
                 [--limit N]  [--task T] [--table T] [--prefix P] [--dry-run]
    meepo stats [--task T] [--table T] [--prefix P] [--json]
    meepo jobs show ID [--task T] [--table T] [--json]
    meepo db upgrade|downgrade|current [--table T] [--revision R]
    meepo schedules list [--task T] [--table T] [--json]
    meepo schedules remove NAME --task T [--table T]
    meepo schedules next NAME --task T [-n N] [--table T] [--json]

Connection options (``--db``, ``--redis``) go before or after the command; without them
``MEEPO_DB_URL`` / ``MEEPO_REDIS_URL`` apply, then the embedded defaults. To keep a
password off the command line (where ``ps`` shows it), give the URL in a file
(``--db-file``, ``--redis-file``, or ``MEEPO_DB_URL_FILE`` / ``MEEPO_REDIS_URL_FILE``) or the
password alone in one (``--db-password-file``, ``--redis-password-file``, or
``MEEPO_DB_PASSWORD_FILE`` / ``MEEPO_REDIS_PASSWORD_FILE``); a password given in ``--db`` or
``--redis`` draws a warning.

Every failure ends in one line on stderr, ``meepo: error: …`` (passwords in URLs
masked), and a non-zero exit status: 2 for bad input (arguments, names, URLs,
MODULE:ATTR), 1 for everything else (a server down, an unknown job or task, a schema
that needs ``meepo db upgrade``). Never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn, TextIO

from . import __version__
from .admin import Admin, DbState, RepushResult, TaskSummary, record_dict, schedule_dict
from .config import (
    DB_ENV,
    PREFETCH_PER_THREAD,
    REDIS_ENV,
    env_url,
    has_password,
    mask_url,
    password_file_env,
    read_secret_file,
    with_password,
)
from .errors import ConfigError, MeepoError
from .records import Status
from .runtime.recycle import Recycler, exec_again
from .task import Task

PROG = "meepo"
#: Repushes larger than this draw a progress bar (when stderr is a terminal).
PROGRESS_THRESHOLD = 1000
#: Repushes up to this size print one line per job; larger ones one line per task.
LIST_LIMIT = 20
REPUSH_STATUSES = (Status.FAILED, Status.TODO, Status.DOING)


class UsageError(Exception):
    """Bad input on the command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) raised to ``main``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# -- argument types ---------------------------------------------------------------------


def _job_id(text: str) -> int:
    if not re.fullmatch(r"\d{1,19}", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid job id {text!r}: expected a positive integer")
    return int(text)


def _positive(text: str) -> int:
    if not re.fullmatch(r"\d{1,9}", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _repush_status(text: str) -> Status:
    for status in REPUSH_STATUSES:
        if text.strip().lower() == status.value:
            return status
    choices = ", ".join(s.value for s in REPUSH_STATUSES)
    raise argparse.ArgumentTypeError(f"unknown status {text!r}: expected one of {choices}")


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
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use ISO 8601 (2024-05-01T12:00:00Z) or an age such as "
            "90s, 30m, 2h, 7d"
        ) from None
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _time(text: str) -> datetime:
    return parse_time(text)


def _schedule_name(text: str) -> str:
    from .schedule import check_name

    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- the parser -------------------------------------------------------------------------


def _common() -> _Parser:
    """Options every command takes, before or after its name."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--db",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"ledger database URL (default: ${DB_ENV}, else the embedded SQLite file)",
    )
    g.add_argument(
        "--redis",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"Redis URL (default: ${REDIS_ENV}, else the embedded Redis server)",
    )
    for name, env in (("db", DB_ENV), ("redis", REDIS_ENV)):
        g.add_argument(
            f"--{name}-file",
            metavar="PATH",
            default=argparse.SUPPRESS,
            help=f"read the --{name} URL from this file (default: ${env}_FILE)",
        )
        g.add_argument(
            f"--{name}-password-file",
            metavar="PATH",
            default=argparse.SUPPRESS,
            help=f"read the password of the --{name} URL from this file "
            f"(default: ${password_file_env(env)})",
        )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log at INFO (a worker logs one line per job state change)",
    )
    return p


def _table_options(p: argparse.ArgumentParser, prefix: bool = False) -> None:
    p.add_argument(
        "--table",
        metavar="NAME",
        help="a task's own ledger table (its table_name=); default: the shared meepo_jobs",
    )
    if prefix:
        p.add_argument(
            "--prefix",
            metavar="P",
            help="Redis key prefix of the tasks (their list_name_prefix=); default: meepo: "
            "for meepo_jobs, meepo:<table>: for another table",
        )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog=PROG,
        description="meepo: a reliable distributed task queue (SQL ledger + Redis transport).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"meepo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "worker",
        parents=[common],
        help="run the consumers and reaper of a Task",
        description="Import MODULE (from the current directory or PYTHONPATH) and run the "
        "Task named ATTR (or returned by ATTR(), a zero-argument callable) until SIGINT or "
        "SIGTERM. --db/--redis set MEEPO_DB_URL/MEEPO_REDIS_URL for Tasks built without "
        "db=/redis=.",
    )
    p.add_argument("target", metavar="MODULE:ATTR")
    p.add_argument("--parallel", type=_positive, metavar="N", help="override parallel_num")
    p.add_argument(
        "--job-timeout",
        type=_seconds,
        metavar="S",
        help="override job_timeout: a handler running longer than S seconds is a failed attempt",
    )
    p.add_argument(
        "--max-jobs",
        type=_positive,
        metavar="N",
        help="after N jobs, finish the running ones and restart the process (same pid)",
    )
    p.add_argument(
        "--max-memory",
        type=_positive,
        metavar="MB",
        help="once resident memory exceeds MB after a job, finish and restart the process",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "repush",
        parents=[common],
        help="put jobs back on their queue as todo",
        description="Move jobs back to todo (failed_times reset to 0) and dispatch them to "
        "their task's Redis queue. By --id (any status; the task is read from each row) or "
        "by --status, where --since/--until bound the time of the job's last change.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=_job_id, nargs="+", metavar="ID", dest="ids")
    which.add_argument(
        "--status", type=_repush_status, metavar="{failed,todo,doing}", dest="status"
    )
    p.add_argument("--since", type=_time, metavar="T", help="changed at or after T (ISO or 2h)")
    p.add_argument("--until", type=_time, metavar="T", help="changed before T (ISO or 2h)")
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N jobs")
    p.add_argument("--task", metavar="TASK", help="only jobs of this task")
    p.add_argument("--dry-run", action="store_true", help="show what would be repushed")
    _table_options(p, prefix=True)
    p.set_defaults(func=cmd_repush)

    p = sub.add_parser(
        "stats",
        parents=[common],
        help="counts by status, oldest todo age and queue depth of every task",
    )
    p.add_argument("--task", metavar="TASK", help="only this task")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _table_options(p, prefix=True)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("jobs", parents=[common], help="inspect jobs")
    jobs = p.add_subparsers(dest="jobs_command", metavar="COMMAND")
    jobs.required = True
    q = jobs.add_parser("show", parents=[common], help="a job's ledger row")
    q.add_argument("job_id", type=_job_id, metavar="ID")
    q.add_argument("--task", metavar="TASK", help="the job must belong to this task")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    _table_options(q)
    q.set_defaults(func=cmd_jobs_show)

    p = sub.add_parser("schedules", parents=[common], help="cron and periodic schedules")
    sched = p.add_subparsers(dest="schedules_command", metavar="COMMAND")
    sched.required = True
    q = sched.add_parser("list", parents=[common], help="every schedule and its next fire")
    q.add_argument("--task", metavar="TASK", help="only this task's schedules")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    _table_options(q)
    q.set_defaults(func=cmd_schedules_list)
    q = sched.add_parser(
        "remove",
        parents=[common],
        help="remove a schedule (jobs it made stay)",
        description="Remove a schedule. An application that declares it at start-up "
        "declares it again: remove the declaration from the code too.",
    )
    q.add_argument("name", type=_schedule_name, metavar="NAME")
    q.add_argument("--task", metavar="TASK", required=True, help="the schedule's task")
    _table_options(q)
    q.set_defaults(func=cmd_schedules_remove)
    q = sched.add_parser("next", parents=[common], help="a schedule's next fire times")
    q.add_argument("name", type=_schedule_name, metavar="NAME")
    q.add_argument("--task", metavar="TASK", required=True, help="the schedule's task")
    q.add_argument("-n", type=_positive, default=5, metavar="N", help="how many (default 5)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    _table_options(q)
    q.set_defaults(func=cmd_schedules_next)

    p = sub.add_parser("db", parents=[common], help="ledger schema migrations")
    db = p.add_subparsers(dest="db_command", metavar="COMMAND")
    db.required = True
    for name, helptext in (
        ("upgrade", "migrate the table to --revision (default: head)"),
        ("downgrade", "migrate the table down to --revision (default: -1; base drops it)"),
        ("current", "show the table's revision and the head revision"),
    ):
        q = db.add_parser(name, parents=[common], help=helptext)
        _table_options(q)
        if name != "current":
            q.add_argument("--revision", metavar="R", help="target revision")
        q.set_defaults(func=cmd_db, db_action=name)
    return parser


# -- connections ------------------------------------------------------------------------


def resolve_connections(args: argparse.Namespace) -> None:
    """Set ``args.db`` and ``args.redis`` from the options, their files and the
    environment (None: the embedded default)."""
    args.db = _connection(args, "db", DB_ENV)
    args.redis = _connection(args, "redis", REDIS_ENV)


def _connection(args: argparse.Namespace, name: str, env: str) -> str | None:
    flag = f"--{name}"
    url: str | None = getattr(args, name, None)
    url_file: str | None = getattr(args, f"{name}_file", None)
    pw_file: str | None = getattr(args, f"{name}_password_file", None)
    if url is not None and url_file is not None:
        raise UsageError(f"give {flag} or {flag}-file, not both")
    if url is not None:
        if not url.strip():
            raise UsageError(f"{flag} needs a URL, not an empty string")
        if has_password(url):
            _stderr(
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


# -- commands ---------------------------------------------------------------------------


def _admin(args: argparse.Namespace, *, prefix: bool = False) -> Admin:
    return Admin(
        getattr(args, "db", None),
        getattr(args, "redis", None),
        table=args.table,
        prefix=args.prefix if prefix else None,
    )


def load_task(spec: str) -> Task:
    """The Task named by ``MODULE:ATTR`` (ATTR may be dotted, or a zero-argument callable
    returning a Task). MODULE is searched in the current directory, then sys.path."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise UsageError(f"expected MODULE:ATTR (such as myapp.tasks:task), not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(
                f"cannot import {module_name!r}: no module named {exc.name!r} in the current "
                "directory or on PYTHONPATH"
            ) from None
        raise RuntimeError(f"importing {module_name!r} failed: {exc}") from exc
    except MeepoError:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Task) and callable(obj):
        obj = obj()
    if not isinstance(obj, Task):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a meepo Task")
    if obj.job_func is None:
        raise UsageError(
            f"{spec} is a Task without job_func: it can push but not consume "
            "(give it a job_func to run it with `meepo worker`)"
        )
    return obj


def cmd_worker(args: argparse.Namespace) -> int:
    # Tasks built without db=/redis= read these when the module is imported.
    if getattr(args, "db", None):
        os.environ[DB_ENV] = args.db
    if getattr(args, "redis", None):
        os.environ[REDIS_ENV] = args.redis
    task = load_task(args.target)
    if args.parallel is not None:
        opts = task.options
        # prefetch follows parallel_num unless the Task set it apart.
        derived = opts.prefetch_auto
        prefetch = PREFETCH_PER_THREAD * args.parallel if derived else opts.prefetch
        task.options = dataclasses.replace(opts, parallel_num=args.parallel, prefetch=prefetch)
    if args.job_timeout is not None:
        task.options = dataclasses.replace(task.options, job_timeout=args.job_timeout)
    if args.max_jobs is None and args.max_memory is None:
        task.run()
        return 0
    recycler = Recycler(task, args.max_jobs, args.max_memory)
    with _signals_seen() as seen:
        try:
            recycler.start()
            task.run()
        finally:
            recycler.close()
    if recycler.reason is None or seen():
        return 0  # stopped by a signal (even one during the recycle): exit
    exec_again(getattr(args, "argv", None))
    return 0  # not reached


@contextlib.contextmanager
def _signals_seen() -> Iterator[Callable[[], bool]]:
    """Whether SIGINT or SIGTERM arrived meanwhile, whoever handled it: Python writes
    the number of every signal it handles to the wakeup fd."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    old = signal.set_wakeup_fd(write_fd)
    got = bytearray()
    is_open = [True]

    def seen() -> bool:
        if is_open[0]:
            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(read_fd, 256))
        return signal.SIGINT in got or signal.SIGTERM in got

    try:
        yield seen
    finally:
        seen()
        is_open[0] = False
        signal.set_wakeup_fd(old)
        os.close(read_fd)
        os.close(write_fd)


class ProgressBar:
    """``repushing 3000/10000 [#####.....] 30%`` redrawn on one terminal line.

    Drawn only when the stream is a terminal and the set is larger than ``threshold``,
    so piped and captured output stays plain."""

    def __init__(self, stream: TextIO, label: str, threshold: int = PROGRESS_THRESHOLD) -> None:
        self.stream = stream
        self.label = label
        self.threshold = threshold
        self.enabled = stream.isatty()
        self.shown = False

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled or max(done, total or 0) <= self.threshold:
            return
        if total:
            width = 30
            filled = min(width, width * done // total)
            bar = "#" * filled + "." * (width - filled)
            line = f"{self.label} {done}/{total} [{bar}] {100 * done // total}%"
        else:
            line = f"{self.label} {done} job(s)"
        self.stream.write("\r" + line)
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def cmd_repush(args: argparse.Namespace) -> int:
    if args.ids is not None and (args.since or args.until or args.limit):
        raise UsageError("--since, --until and --limit go with --status, not --id")
    if args.since and args.until and args.since >= args.until:
        raise UsageError("--since must be before --until")
    admin = _admin(args, prefix=True)
    bar = ProgressBar(sys.stderr, "would repush" if args.dry_run else "repushing")
    try:
        result = admin.repush(
            args.ids,
            status=args.status,
            since=args.since,
            until=args.until,
            limit=args.limit,
            task_id=args.task,
            dry_run=args.dry_run,
            progress=bar,
        )
    finally:
        bar.close()
    _print_repush(result)
    if result.skipped:
        ids = ", ".join(str(i) for i in result.skipped[:10])
        more = " …" if len(result.skipped) > 10 else ""
        _stderr(
            f"warning: {len(result.skipped)} job(s) kept changing while being repushed and "
            f"were left as they are: {ids}{more}"
        )
        return 1
    return 0


def _print_repush(result: RepushResult) -> None:
    verb = "would repush" if result.dry_run else "repushed"
    if result.count <= LIST_LIMIT:
        for j in result.jobs:
            was = j.previous.value if result.dry_run else f"was {j.previous.value}"
            print(f"{verb} job {j.id} (task {j.task_id}, {was})")
    else:
        for task_id, n in result.by_task().items():
            print(f"{verb} {n} job(s) of task {task_id}")
    tail = " (dry run: nothing changed)" if result.dry_run else ""
    print(f"{verb} {result.count} job(s){tail}")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def cmd_stats(args: argparse.Namespace) -> int:
    admin = _admin(args, prefix=True)
    found: list[TaskSummary] = admin.stats(args.task)
    if args.json:
        print(json.dumps({"table": admin.table, "tasks": [s.to_dict() for s in found]}, indent=2))
        return 0
    if not found:
        print(f"no jobs in table {admin.table}")
        return 0
    headers = [
        "TASK", *(s.value.upper() for s in Status), "OLDEST TODO", "QUEUE", "DELAYED", "QUEUES",
    ]  # fmt: skip
    rows = [
        [
            s.task_id,
            *(str(s.counts.get(st, 0)) for st in Status),
            _age(s.oldest_todo_age),
            "-" if s.queue_depth is None else str(s.queue_depth),
            "-" if s.delayed is None else str(s.delayed),
            " ".join(f"{p}={n}" for p, n in s.queues.items()) or "-",
        ]
        for s in found
    ]
    for line in _table(headers, rows):
        print(line)
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    admin = _admin(args)
    rec = admin.job(args.job_id, args.task)
    data = record_dict(rec)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    payload = data.pop("payload")
    size = data.pop("payload_size")
    if len(payload) > 1000:
        payload = payload[:1000] + "…"
    data["payload"] = f"{payload!r} ({size} bytes)"
    width = max(len(k) for k in data) + 1
    for key, value in data.items():
        shown = "-" if value is None else str(value)
        print(f"{key + ':':<{width}} {shown}")
    return 0


def _when(d: datetime | None) -> str:
    return "-" if d is None else d.isoformat(sep=" ", timespec="seconds")


def cmd_schedules_list(args: argparse.Namespace) -> int:
    admin = _admin(args)
    found = admin.schedules(args.task)
    if args.json:
        print(
            json.dumps(
                {"table": admin.table, "schedules": [schedule_dict(s) for s in found]}, indent=2
            )
        )
        return 0
    if not found:
        where = f"task {args.task}" if args.task else f"table {admin.table}"
        print(f"no schedules in {where}")
        return 0
    headers = [
        "TASK",
        "NAME",
        "KIND",
        "EXPR",
        "TZ",
        "MISFIRE",
        "PRIORITY",
        "NEXT FIRE",
        "LAST FIRE",
    ]
    rows = [
        [
            s.task_id,
            s.name,
            s.kind,
            s.expr if s.kind == "cron" else f"{s.expr}s",
            s.tz,
            s.misfire,
            s.priority,
            _when(s.next_fire_at) if s.next_fire_at else "finished",
            _when(s.last_fire_at),
        ]
        for s in found
    ]
    for line in _table(headers, rows):
        print(line)
    return 0


def cmd_schedules_remove(args: argparse.Namespace) -> int:
    admin = _admin(args)
    admin.unschedule(args.task, args.name)
    print(f"removed schedule {args.name} of task {args.task}")
    return 0


def cmd_schedules_next(args: argparse.Namespace) -> int:
    from .schedule import zone

    admin = _admin(args)
    rec = admin.schedule(args.task, args.name)
    fires = admin.next_fires(args.task, args.name, args.n)
    if args.json:
        data = {"task_id": rec.task_id, "name": rec.name, "next": [t.isoformat() for t in fires]}
        print(json.dumps(data, indent=2))
        return 0
    if not fires:
        print(f"schedule {rec.name} of task {rec.task_id} is finished (no fire left)")
        return 0
    local = zone(rec.tz) if rec.tz != "UTC" else None
    for t in fires:
        extra = f"  ({t.astimezone(local).strftime('%Y-%m-%d %H:%M:%S')} {rec.tz})" if local else ""
        print(t.isoformat() + extra)
    return 0


def _db_line(state: DbState) -> str:
    current = state.current or "none (not migrated)"
    if state.at_head:
        return f"table {state.table}: {current} (head)"
    return f"table {state.table}: {current} (head is {state.head})"


def cmd_db(args: argparse.Namespace) -> int:
    admin = _admin(args)
    action: str = args.db_action
    if action == "current":
        print(_db_line(admin.db_current()))
        return 0
    before = admin.db_current().current
    if action == "upgrade":
        after = admin.db_upgrade(args.revision or "head")
    else:
        after = admin.db_downgrade(args.revision or "-1")
    if before == after.current:
        print(f"{_db_line(after)}: nothing to do")
    else:
        verb = "upgraded" if action == "upgrade" else "downgraded"
        print(f"table {after.table}: {verb} from {before or 'none'} to {after.current or 'none'}")
    return 0


# -- entry point ------------------------------------------------------------------------


def _stderr(message: str) -> None:
    """One line on stderr, prefixed ``meepo:``, passwords masked."""
    lines = [line.strip() for line in mask_url(message).splitlines() if line.strip()]
    sys.stderr.write(f"{PROG}: {lines[0] if lines else 'failed'}\n")
    sys.stderr.flush()


def _fail(message: str, code: int) -> int:
    _stderr(f"error: {message}")
    return code


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(mask_url(self.format(record)) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _logging(verbose: bool, worker: bool) -> Callable[[], None]:
    """Route the ``meepo`` loggers to stderr for the command's duration."""
    logger = logging.getLogger("meepo")
    handler = _StderrHandler()
    if worker:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        fmt = f"{PROG}: %(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    func: Callable[[argparse.Namespace], int] = args.func
    args.argv = None if argv is None else list(argv)  # a recycled worker runs it again
    restore = _logging(bool(getattr(args, "verbose", False)), args.command == "worker")
    try:
        resolve_connections(args)
        return func(args)
    except (UsageError, ConfigError) as exc:
        return _fail(str(exc), 2)
    except MeepoError as exc:
        return _fail(str(exc), 1)
    except ValueError as exc:
        return _fail(str(exc) or type(exc).__name__, 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        _silence_stdout()  # `meepo stats | head`: the reader left; not an error to report
        return 1
    except Exception as exc:
        return _fail(_describe(exc), 1)
    finally:
        restore()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _describe(exc: Exception) -> str:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
