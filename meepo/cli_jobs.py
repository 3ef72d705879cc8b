"""Job management from the shell: ``meepo jobs list``, ``meepo jobs delete``,
``meepo push`` and ``meepo purge`` (docs/jobs.md, docs/retention.md).

::

    meepo jobs list [FILTERS] [--limit N] [--after-id ID] [--json]
    meepo jobs delete --id ID [ID ...] | FILTERS [--dry-run] [--yes] [--force]
    meepo push TASK --payload TEXT | --payload-file F | --json VALUE
               [--delay S] [--priority P] [--key K] [--unique-for S]
    meepo purge --task T [--status done|failed|cancelled] [--older-than 7d] [--dry-run] [--archive]
    meepo stats [--task T] [--json] [--watch [--interval S]]

FILTERS: ``--task``, ``--status`` (repeatable), ``--priority``, ``--key``,
``--since``/``--until`` (the job's last change), ``--error-contains TEXT``.

Thin: the statements are in :mod:`meepo.ledger.retention`. ``jobs list`` and the dry
runs only read, and none of them needs Redis; ``push`` is the only one that does. A
command on an SQLite ledger that does not exist says so and creates nothing (push
excepted: it creates the embedded ledger, as a Task does).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from .admin import Admin, TaskSummary, record_dict
from .cli.commands import (
    job_ids,
    json_option,
    missing_ledger,
    no_ledger,
    prefix_option,
    table_option,
)
from .cli.commands import jobs as jobs_group
from .cli.common import (
    JOB_ID,
    POSITIVE,
    SECONDS,
    TIME,
    UsageError,
    _Type,
    common_options,
    connections,
    missing_sqlite_file,
    stderr,
)
from .cli.output import ProgressBar, age, when
from .cli.output import table as format_table
from .config import (
    DEFAULT_TABLE,
    check_prefix,
    check_table_name,
    check_task_id,
    default_db_url,
    default_redis_url,
    home_dir,
)
from .errors import JobNotFoundError, MeepoError, TaskNotFoundError
from .ledger.retention import CHUNK, Found, JobFilter, Retention
from .records import Status
from .runtime.cleaner import parse_duration

#: ``jobs list`` shows this many jobs unless ``--limit`` says otherwise.
DEFAULT_LIMIT = 50
#: ``jobs delete`` lists each job up to this many, then one line per task.
LIST_LIMIT = 20


def _status(text: str) -> Status:
    try:
        return Status.parse(text.strip())
    except ValueError:
        choices = ", ".join(s.value for s in Status)
        raise ValueError(f"unknown status {text!r}: expected one of {choices}") from None


def _finished(text: str) -> Status:
    status = _status(text)
    if not status.terminal:
        raise ValueError(f"only finished jobs are purged: done, failed or cancelled, not {status}")
    return status


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "duration")
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("duration: ")) from None


STATUS = _Type("STATUS", _status)
FINISHED = _Type("STATUS", _finished)
DURATION = _Type("DURATION", _duration)


#: The keyword arguments :func:`filter_options` adds and gathers into one
#: :class:`Filters`.
FILTER_PARAMS = ("task", "statuses", "priority", "key", "since", "until", "error_contains")


@dataclass(frozen=True)
class Filters:
    """The filter options of ``jobs list`` and ``jobs delete``, as given."""

    task: str | None = None
    statuses: tuple[Status, ...] = ()
    priority: str | None = None
    key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    error_contains: str | None = None

    def job_filter(self, ids: list[int] | None = None) -> JobFilter:
        """The checked filter (with ``--id``'s ``ids``); UsageError naming a bad one."""
        if self.task is not None:
            check_task_id(self.task)
        if self.since and self.until and self.since >= self.until:
            raise UsageError("--since must be before --until")
        if self.error_contains is not None and not self.error_contains:
            raise UsageError("--error-contains needs some text")
        return JobFilter(
            task_id=self.task,
            statuses=tuple(dict.fromkeys(self.statuses)),
            priority=self.priority,
            key=self.key,
            since=self.since,
            until=self.until,
            error_contains=self.error_contains,
            ids=None if ids is None else tuple(ids),
        )


def filter_options(f: Any) -> Any:
    """The filters ``jobs list`` and ``jobs delete`` share, and ``--table``: the command
    receives them as one ``filters`` argument (:class:`Filters`) and ``table``."""

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        filters = Filters(**{name: kwargs.pop(name) for name in FILTER_PARAMS})
        return f(*args, filters=filters, **kwargs)

    opts = [
        click.option("--task", metavar="TASK", help="Only jobs of this task."),
        click.option(
            "--status",
            "statuses",
            type=STATUS,
            multiple=True,
            metavar="STATUS",
            help="Only jobs in this status (todo, doing, done, failed, cancelled); repeatable.",
        ),
        click.option("--priority", metavar="P", help="Only jobs of this priority queue."),
        click.option("--key", metavar="K", help="Only the job holding this unique key."),
        click.option("--since", type=TIME, metavar="T", help="Changed at or after T (ISO or 2h)."),
        click.option("--until", type=TIME, metavar="T", help="Changed before T (ISO or 2h)."),
        click.option(
            "--error-contains",
            metavar="TEXT",
            help="Only jobs whose last error contains TEXT (any case).",
        ),
    ]
    for opt in reversed(opts):
        command = opt(command)
    return table_option(command)


def store(ctx: click.Context, table: str | None) -> Retention:
    """The retention statements on the command's ledger table. On an SQLite ledger
    that does not exist (nothing to list, delete or purge) they stop here, having
    created nothing."""
    from .connect import engine_for

    db, _ = connections(ctx)
    url = db or default_db_url()
    _require_sqlite_file(url)
    return Retention(engine_for(url), check_table_name(table or DEFAULT_TABLE))


def _require_sqlite_file(url: str) -> None:
    """A query of rows on an SQLite ledger that does not exist: exit 1, nothing
    created (``stats`` reads the same as an empty overview, see missing_ledger)."""
    path = missing_sqlite_file(url)  # a bad URL is named first, with its fix
    if path is not None:
        raise MeepoError(
            f"no ledger database at {path}: nothing to read (a worker or `meepo db "
            "upgrade` creates it)"
        )


# -- jobs list --------------------------------------------------------------------------


@jobs_group.command(
    "list",
    short_help="Jobs matching filters, by id, a page at a time.",
    help="Jobs matching every filter given, by id: --limit per page (default "
    f"{DEFAULT_LIMIT}), and --after-id the last id shown to see the next page. Reads only.",
)
@filter_options
@click.option("--limit", type=POSITIVE, default=DEFAULT_LIMIT, metavar="N", help="Page size.")
@click.option("--after-id", type=JOB_ID, metavar="ID", help="Jobs with ids above ID.")
@json_option
@common_options
@click.pass_context
def jobs_list(
    ctx: click.Context,
    filters: Filters,
    table: str | None,
    limit: int,
    after_id: int | None,
    as_json: bool,
) -> int:
    flt = filters.job_filter()
    found = store(ctx, table).list_jobs(flt, limit=limit, after_id=after_id)
    next_id = found[-1].id if len(found) == limit else None
    if as_json:
        data = {
            "table": table or DEFAULT_TABLE,
            "jobs": [record_dict(r) for r in found],
            "next_after_id": next_id,
        }
        click.echo(json.dumps(data, indent=2))
        return 0
    if not found:
        click.echo("no jobs match")
        return 0
    headers = ["ID", "TASK", "STATUS", "PRIORITY", "FAILED", "UPDATED", "LAST ERROR"]
    rows = [
        [
            str(r.id),
            r.task_id,
            r.status.value,
            r.priority,
            str(r.failed_times),
            when(r.updated_at),
            _short(r.last_error),
        ]
        for r in found
    ]
    # The id column right-aligned like the other numbers: the table left-aligns the first.
    width = max(len(r[0]) for r in [*rows, headers])
    for row in [headers, *rows]:
        row[0] = row[0].rjust(width)
    for line in format_table(headers, rows):
        click.echo(line)
    if next_id is not None:
        stderr(f"more jobs may follow: --after-id {next_id}")
    return 0


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


# -- jobs delete ------------------------------------------------------------------------


@jobs_group.command(
    "delete",
    short_help="Delete jobs by id or by filters.",
    help="Delete jobs by --id or by filters (at least one). A running (doing) job is "
    "refused unless --force, which deletes it and fences its worker: its heartbeats and "
    "commit then change nothing. Asks for confirmation on a terminal; elsewhere needs --yes.",
)
@click.option("--id", "first_id", type=JOB_ID, metavar="ID", help="Job id(s): --id 3 4 5.")
@click.argument("more_ids", nargs=-1, type=JOB_ID, metavar="[ID]...")
@filter_options
@click.option("--dry-run", is_flag=True, help="Show what would be deleted.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Delete running jobs too (fencing their workers).")
@common_options
@click.pass_context
def jobs_delete(
    ctx: click.Context,
    first_id: int | None,
    more_ids: tuple[int, ...],
    filters: Filters,
    table: str | None,
    dry_run: bool,
    yes: bool,
    force: bool,
) -> int:
    ids = job_ids(first_id, more_ids)
    flt = filters.job_filter(ids)
    if ids is None and flt.empty:
        raise UsageError("give --id or at least one filter (--task, --status, ...)")
    st = store(ctx, table)
    rows = _matching(st, flt)
    if ids is not None:
        missing = sorted(set(ids) - {r[0] for r in rows})
        if missing:
            shown = ", ".join(str(i) for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise JobNotFoundError(
                f"no job {shown}{more} matching in table {st.table_name!r}; nothing was deleted"
            )
    running = [r[0] for r in rows if r[3] is Status.DOING]
    if running and not force:
        shown = ", ".join(str(i) for i in running[:10])
        more = " …" if len(running) > 10 else ""
        raise UsageError(
            f"{len(running)} job(s) are running (doing): {shown}{more}; nothing was deleted "
            "(--force deletes them and fences their workers)"
        )
    if dry_run:
        _print_rows(rows, "would delete")
        click.echo(f"would delete {len(rows)} job(s) (dry run: nothing changed)")
        return 0
    if not rows:
        click.echo("deleted 0 job(s): none match")
        return 0
    _confirm(yes, f"delete {len(rows)} job(s) from table {st.table_name}")
    bar = ProgressBar(sys.stderr, "deleting")
    gone: list[int] = []
    try:
        for i in range(0, len(rows), CHUNK):
            gone.extend(st.delete(rows[i : i + CHUNK]))
            bar(len(gone), len(rows))
    finally:
        bar.close()
    deleted = set(gone)
    _print_rows([r for r in rows if r[0] in deleted], "deleted")
    click.echo(f"deleted {len(gone)} job(s)")
    moved = [r[0] for r in rows if r[0] not in deleted]
    if moved:
        shown = ", ".join(str(i) for i in moved[:10])
        more = " …" if len(moved) > 10 else ""
        stderr(
            f"warning: {len(moved)} job(s) changed while being deleted and were left as "
            f"they are: {shown}{more}"
        )
        return 1
    return 0


def _matching(st: Retention, flt: JobFilter) -> list[Found]:
    rows: list[Found] = []
    after: int | None = None
    while True:
        page = st.matching(flt, limit=CHUNK, after_id=after)
        rows.extend(page)
        if len(page) < CHUNK:
            return rows
        after = page[-1][0]


def _print_rows(rows: list[Found], verb: str) -> None:
    if len(rows) <= LIST_LIMIT:
        for job_id, task_id, _, status in rows:
            click.echo(f"{verb} job {job_id} (task {task_id}, {status.value})")
        return
    by_task: dict[str, int] = {}
    for _, task_id, _, _ in rows:
        by_task[task_id] = by_task.get(task_id, 0) + 1
    for task_id, n in sorted(by_task.items()):
        click.echo(f"{verb} {n} job(s) of task {task_id}")


def _confirm(yes: bool, what: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"refusing to {what} without --yes (no terminal to ask)")
    if not click.confirm(f"{what}?", default=False, err=True):
        raise UsageError("not confirmed: nothing was deleted")


# -- push -------------------------------------------------------------------------------


@click.command(
    "push",
    short_help="Enqueue one job from the shell.",
    help="Push one job to TASK: its payload from --payload (UTF-8 text), --payload-file "
    "(bytes as they are; - for stdin) or --json (a JSON value, stored compact). Prints the "
    "job's id.",
)
@click.argument("task_id", metavar="TASK")
@click.option("--payload", metavar="TEXT", help="The payload as text.")
@click.option("--payload-file", metavar="F", help="The payload from a file (- : stdin).")
@click.option("--json", "json_value", metavar="VALUE", help="The payload as a JSON value.")
@click.option("--delay", type=SECONDS, metavar="S", help="Due in S seconds.")
@click.option("--priority", metavar="P", help="The priority queue (default: the task's).")
@click.option("--key", metavar="K", help="A unique key: pushed only if no job holds it.")
@click.option(
    "--unique-for", type=SECONDS, metavar="S", help="With --key: hold it S seconds after."
)
@table_option
@common_options
@click.pass_context
def push(
    ctx: click.Context,
    task_id: str,
    payload: str | None,
    payload_file: str | None,
    json_value: str | None,
    delay: float | None,
    priority: str | None,
    key: str | None,
    unique_for: float | None,
    table: str | None,
) -> int:
    given = [n for n, v in (("--payload", payload), ("--payload-file", payload_file),
                            ("--json", json_value)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise UsageError(
            "give one of --payload, --payload-file or --json"
            + (f", not {' and '.join(given)}" if given else "")
        )
    if unique_for is not None and key is None:
        raise UsageError("--unique-for goes with --key")
    data = _payload(payload, payload_file, json_value)
    from .task import Task

    db, redis = connections(ctx)
    extra: dict[str, Any] = {}
    if priority is not None:
        # The CLI does not know the task's priorities: the one named is the queue.
        extra = {"priorities": [priority], "default_priority": priority}
    task = Task(check_task_id(task_id), db, redis, table_name=table, **extra)
    held = None if key is None else task.ledger.unique_holder(task.task_id, key)
    job_id = task.push(data, delay=delay, key=key, unique_for=unique_for)
    if held is not None and held == job_id:
        click.echo(f"job {job_id} of task {task.task_id} holds key {key!r}: nothing pushed")
        return 0
    click.echo(f"pushed job {job_id} to task {task.task_id}")
    return 0


def _payload(text: str | None, path: str | None, value: str | None) -> bytes:
    if text is not None:
        return text.encode()
    if value is not None:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise UsageError(f"--json: not valid JSON ({exc})") from None
        return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
    assert path is not None
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"--payload-file {path}: {exc.strerror or exc}") from None


# -- purge ------------------------------------------------------------------------------


@click.command(
    "purge",
    short_help="Remove a task's old finished jobs (or archive them).",
    help="Remove a task's finished jobs (done, failed, cancelled) whose last change is older than "
    "--older-than (default: the task's stored retention), in chunks of at most 1,000 rows "
    "(racing workers' cleaners is safe). Jobs still holding a unique key are kept. "
    "--archive moves them into <table>_archive instead.",
)
@click.option("--task", metavar="TASK", required=True, help="The task.")
@click.option(
    "--status",
    "statuses",
    type=FINISHED,
    multiple=True,
    metavar="STATUS",
    help="done, failed or cancelled (repeatable; default: those the retention names, "
    "else all three).",
)
@click.option("--older-than", type=DURATION, metavar="DURATION", help="90s, 30m, 12h, 7d, 2w.")
@click.option("--dry-run", is_flag=True, help="Count what would be removed.")
@click.option("--archive", is_flag=True, help="Move the rows into <table>_archive.")
@table_option
@common_options
@click.pass_context
def purge(
    ctx: click.Context,
    task: str,
    statuses: tuple[Status, ...],
    older_than: float | None,
    dry_run: bool,
    archive: bool,
    table: str | None,
) -> int:
    check_task_id(task)
    st = store(ctx, table)
    if older_than is not None:
        finished = (Status.DONE, Status.FAILED, Status.CANCELLED)
        keep = {s: older_than for s in (statuses or finished)}
    else:
        stored = st.policy(task)
        keep = {s: v for s, v in stored.items() if not statuses or s in statuses}
        if not keep:
            which = " for " + ", ".join(s.value for s in statuses) if statuses and stored else ""
            raise UsageError(f"give --older-than: task {task!r} has no stored retention{which}")
    now = st.db_now()
    total = 0
    for status, secs in sorted(keep.items()):
        cutoff = now - timedelta(seconds=secs)
        age = _age(secs)
        if dry_run:
            n = st.count_older(task, status, cutoff)
            click.echo(f"would purge {n} {status.value} job(s) of task {task} older than {age}")
            total += n
            continue
        n, held = _purge(st, task, status, cutoff, archive)
        verb = f"archived into {st.archive.name}" if archive else "purged"
        tail = f" ({held} kept: they hold a unique key)" if held else ""
        click.echo(f"{verb} {n} {status.value} job(s) of task {task} older than {age}{tail}")
        total += n
    if dry_run:
        click.echo(f"would purge {total} job(s) (dry run: nothing changed)")
    return 0


def _purge(
    st: Retention,
    task: str,
    status: Status,
    cutoff: datetime,
    archive: bool,
) -> tuple[int, int]:
    """One status's purge, chunk by chunk, with a progress bar on a terminal."""
    total = st.count_older(task, status, cutoff)
    bar = ProgressBar(sys.stderr, f"purging {status.value}", threshold=0)
    removed = held = 0
    cursor = None
    try:
        while True:
            chunk = st.purge_chunk(task, status, cutoff, after=cursor, archive=archive)
            removed += chunk.removed
            held += chunk.held
            bar(removed + held, max(total, removed + held))
            cursor = chunk.cursor
            if cursor is None:
                break
    finally:
        bar.close()
    return removed, held


def _age(secs: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size and secs % size == 0:
            return f"{int(secs // size)}{unit}"
    return f"{secs:g}s"


# -- stats ------------------------------------------------------------------------------

#: What the queue columns say when Redis cannot be asked.
UNAVAILABLE = "unavailable"


@click.command(
    "stats",
    short_help="Counts by status, oldest todo age and queue depths.",
    help="Counts by status and the oldest todo job's age of every task (from the ledger), "
    "and the depth of its Redis queues. With Redis unreachable the ledger's counts are "
    f"still shown and the queue columns say {UNAVAILABLE!r}. --watch redraws every "
    "--interval seconds until Ctrl-C.",
)
@click.option("--task", metavar="TASK", help="Only this task.")
@json_option
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option(
    "--interval", type=SECONDS, default=2.0, metavar="S", help="--watch period (default 2)."
)
@table_option
@prefix_option
@common_options
@click.pass_context
def stats(
    ctx: click.Context,
    task: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
    table: str | None,
    prefix: str | None,
) -> int:
    db, redis = connections(ctx)
    check_table_name(table or DEFAULT_TABLE)
    if prefix is not None:
        check_prefix(prefix)
    path = missing_ledger(ctx)  # read-only: a ledger not there yet is read as empty
    if path is not None:
        name = table or DEFAULT_TABLE
        if task is not None:
            check_task_id(task)
            raise TaskNotFoundError(f"no task {task!r}: {no_ledger(path)}")
        if as_json:
            click.echo(json.dumps({"table": name, "tasks": []}, indent=2))
        else:
            click.echo(f"no jobs in table {name}: {no_ledger(path)}")
        return 0
    no_redis: str | None = None
    if redis is None and default_redis_url() is None:
        # The embedded default: read its queues if a worker started the server, never
        # start one to read it (a read-only command starts and creates nothing).
        from .transport.embedded import running_embedded_url

        redis = running_embedded_url(home_dir() / "redis")
        if redis is None:
            no_redis = (
                "no embedded Redis server is running (meepo stats does not start one; "
                "a worker does, or set MEEPO_REDIS_URL / --redis)"
            )
    admin = Admin(db, redis, table=table, prefix=prefix)
    if not watch:
        return _stats_once(admin, task, as_json, no_redis)
    clear = sys.stdout.isatty() and not as_json
    stop = threading.Event()
    try:
        while True:
            if clear:
                click.echo("\x1b[H\x1b[2J", nl=False)
            click.echo(f"every {interval:g}s, {when(datetime.now(timezone.utc))} (Ctrl-C ends)")
            _stats_once(admin, task, as_json, no_redis)
            sys.stdout.flush()
            stop.wait(interval)
    except KeyboardInterrupt:
        return 0


def _stats_once(admin: Admin, task: str | None, as_json: bool, no_redis: str | None = None) -> int:
    """One table of stats; ``no_redis``: why Redis is not asked at all (the ledger's
    counts only, the queue columns unavailable)."""
    from redis import RedisError

    from .errors import TransportUnavailableError

    redis_error: str | None = no_redis
    if no_redis is not None:
        found = _ledger_stats(admin, task)
    else:
        try:
            found = admin.stats(task)
        except (TransportUnavailableError, RedisError) as exc:
            text = str(exc).strip()
            redis_error = text.splitlines()[0] if text else type(exc).__name__
            found = _ledger_stats(admin, task)
    if as_json:
        data: dict[str, Any] = {"table": admin.table, "tasks": [s.to_dict() for s in found]}
        data["redis"] = "ok" if redis_error is None else f"{UNAVAILABLE}: {redis_error}"
        click.echo(json.dumps(data, indent=2))
    elif not found:
        click.echo(f"no jobs in table {admin.table}")
    else:
        headers = [
            "TASK", *(s.value.upper() for s in Status), "OLDEST TODO", "QUEUE", "DELAYED",
            "QUEUES",
        ]  # fmt: skip

        def depth(n: int | None) -> str:
            return UNAVAILABLE if redis_error is not None else "-" if n is None else str(n)

        rows = [
            [
                s.task_id,
                *(str(s.counts.get(st, 0)) for st in Status),
                age(s.oldest_todo_age),
                depth(s.queue_depth),
                depth(s.delayed),
                UNAVAILABLE
                if redis_error is not None
                else " ".join(f"{p}={n}" for p, n in s.queues.items()) or "-",
            ]
            for s in found
        ]
        for line in format_table(headers, rows):
            click.echo(line)
    if redis_error is not None:
        stderr(f"warning: queue depths {UNAVAILABLE}: {redis_error}")
    return 0


def _ledger_stats(admin: Admin, task: str | None) -> list[TaskSummary]:
    """``admin.stats`` without Redis: the ledger's counts, no queue depths."""
    found = admin.ledger.stats(task)
    if task is not None and not found:
        raise TaskNotFoundError(f"no task {task!r} in table {admin.table!r}")
    now = admin.clock()
    return [
        TaskSummary(
            task_id=s.task_id,
            counts={st: s.counts.get(st, 0) for st in Status},
            oldest_todo=s.oldest_todo,
            oldest_todo_age=(
                None if s.oldest_todo is None else max(0.0, (now - s.oldest_todo).total_seconds())
            ),
            queue_depth=None,
        )
        for s in found
    ]


def register(group: click.Group) -> None:
    """Add ``push`` and ``purge`` to the ``meepo`` group, and ``stats`` in place of the
    one without ``--watch`` (``jobs list`` and ``jobs delete`` joined the ``jobs`` group
    on import)."""
    group.add_command(push)
    group.add_command(purge)
    group.add_command(stats)
