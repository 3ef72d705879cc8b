"""The commands over a ledger table: ``repush``, ``cancel``, ``stats``, ``jobs``,
``schedules``, ``db``.

Thin: each reads its options, calls :mod:`meepo.admin` and prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import click

from ..admin import (
    Admin,
    CancelResult,
    DbState,
    RepushResult,
    TaskSummary,
    json_view,
    record_dict,
    schedule_dict,
)
from ..client import ALREADY, CANCELLED
from ..config import DEFAULT_TABLE, check_prefix, check_table_name, check_task_id
from ..errors import JobNotFoundError, TaskNotFoundError
from ..records import Status
from .common import (
    CANCEL_STATUS,
    JOB_ID,
    POSITIVE,
    REPUSH_STATUS,
    SCHEDULE_NAME,
    TIME,
    UsageError,
    common_options,
    connections,
    missing_sqlite_file,
    stderr,
)
from .output import ProgressBar, age, when
from .output import table as format_table

#: Repushes up to this size print one line per job; larger ones one line per task.
LIST_LIMIT = 20


def table_option(f: Any) -> Any:
    return click.option(
        "--table",
        metavar="NAME",
        help="A task's own ledger table (its table_name=); default: the shared meepo_jobs.",
    )(f)


def prefix_option(f: Any) -> Any:
    return click.option(
        "--prefix",
        metavar="P",
        help="Redis key prefix of the tasks (their list_name_prefix=); default: meepo: for "
        "meepo_jobs, meepo:<table>: for another table.",
    )(f)


def json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


def admin_for(ctx: click.Context, table: str | None, prefix: str | None = None) -> Admin:
    db, redis = connections(ctx)
    return Admin(db, redis, table=table, prefix=prefix)


def missing_ledger(ctx: click.Context) -> str | None:
    """For a read-only command, which creates no file: the path of a SQLite ledger
    that does not exist yet (opening it would create it and its directory), or None.
    A bad --redis URL is named too, even with nothing to read."""
    from ..config import default_db_url
    from ..urls import check_redis_url

    db, redis = connections(ctx)
    if redis is not None:
        check_redis_url(redis)
    return missing_sqlite_file(db or default_db_url())


def no_ledger(path: str) -> str:
    return f"no ledger database at {path} yet (`meepo db upgrade` or a first push creates it)"


def selection_options(
    status_type: click.ParamType[Any], metavar: str, verb: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The job selection ``repush`` and ``cancel`` share: ``--id ID...``, or
    ``--status`` (of ``status_type``) with ``--since``/``--until``/``--limit``/``--task``,
    and ``--dry-run`` (showing what would be ``verb``); checked by :func:`_selection`."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            [
                click.option(
                    "--id", "first_id", type=JOB_ID, metavar="ID", help="Job id(s): --id 3 4 5."
                ),
                click.argument("more_ids", nargs=-1, type=JOB_ID, metavar="[ID]..."),
                click.option(
                    "--status",
                    type=status_type,
                    metavar=metavar,
                    help="Jobs in this status (with --since, --until, --limit).",
                ),
                click.option(
                    "--since", type=TIME, metavar="T", help="Changed at or after T (ISO or 2h)."
                ),
                click.option(
                    "--until", type=TIME, metavar="T", help="Changed before T (ISO or 2h)."
                ),
                click.option("--limit", type=POSITIVE, metavar="N", help="At most N jobs."),
                click.option("--task", metavar="TASK", help="Only jobs of this task."),
                click.option("--dry-run", is_flag=True, help=f"Show what would be {verb}."),
            ]
        ):
            f = option(f)
        return f

    return decorate


# -- repush -----------------------------------------------------------------------------


@click.command(
    "repush",
    short_help="Put jobs back on their queue as todo.",
    help="Move jobs back to todo (failed_times reset to 0) and dispatch them to their "
    "task's Redis queue. By --id (any status; the task is read from each row) or by "
    "--status, where --since/--until bound the time of the job's last change.",
)
@selection_options(REPUSH_STATUS, "{failed,todo,doing,cancelled}", "repushed")
@table_option
@prefix_option
@common_options
@click.pass_context
def repush(
    ctx: click.Context,
    first_id: int | None,
    more_ids: tuple[int, ...],
    status: Status | None,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
    task: str | None,
    dry_run: bool,
    table: str | None,
    prefix: str | None,
) -> int:
    ids = _selection(first_id, more_ids, status, since, until, limit)
    admin = admin_for(ctx, table, prefix)
    bar = ProgressBar(sys.stderr, "would repush" if dry_run else "repushing")
    try:
        result = admin.repush(
            ids,
            status=status,
            since=since,
            until=until,
            limit=limit,
            task_id=task,
            dry_run=dry_run,
            progress=bar,
        )
    finally:
        bar.close()
    _print_repush(result)
    return _skipped(result.skipped, "repushed")


def _selection(
    first_id: int | None,
    more_ids: tuple[int, ...],
    status: Status | None,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
) -> list[int] | None:
    """The ids of ``--id`` (None: the jobs are chosen by ``--status`` and its filters),
    after the checks ``repush`` and ``cancel`` share."""
    ids = job_ids(first_id, more_ids)
    if ids is not None and status is not None:
        raise UsageError("--status is not allowed with --id")
    if ids is None and status is None:
        raise UsageError("one of --id or --status is required")
    if ids is not None and (since or until or limit):
        raise UsageError("--since, --until and --limit go with --status, not --id")
    if since and until and since >= until:
        raise UsageError("--since must be before --until")
    return ids


def _skipped(skipped: Sequence[int], verb: str) -> int:
    """The exit code of ``repush``/``cancel``: 1, with a warning naming them, when jobs
    kept changing while being ``verb`` and were left as they are."""
    if not skipped:
        return 0
    shown = ", ".join(str(i) for i in skipped[:10])
    more = " …" if len(skipped) > 10 else ""
    stderr(
        f"warning: {len(skipped)} job(s) kept changing while being {verb} and were left "
        f"as they are: {shown}{more}"
    )
    return 1


# -- cancel -----------------------------------------------------------------------------


@click.command(
    "cancel",
    short_help="Cancel jobs: todo at once, doing when their handler ends.",
    help="Cancel jobs. A todo job (due or delayed) becomes cancelled at once; a doing job "
    "is flagged, its handler sees job.cancel_requested, and it becomes cancelled when the "
    "handler ends. Finished jobs are left as they are. By --id (the task is read from each "
    "row) or by --status todo|doing, where --since/--until bound the time of the job's "
    "last change.",
)
@selection_options(CANCEL_STATUS, "{todo,doing}", "cancelled")
@table_option
@prefix_option
@common_options
@click.pass_context
def cancel(
    ctx: click.Context,
    first_id: int | None,
    more_ids: tuple[int, ...],
    status: Status | None,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
    task: str | None,
    dry_run: bool,
    table: str | None,
    prefix: str | None,
) -> int:
    ids = _selection(first_id, more_ids, status, since, until, limit)
    admin = admin_for(ctx, table, prefix)
    bar = ProgressBar(sys.stderr, "would cancel" if dry_run else "cancelling")
    try:
        result = admin.cancel(
            ids,
            status=status,
            since=since,
            until=until,
            limit=limit,
            task_id=task,
            dry_run=dry_run,
            progress=bar,
        )
    finally:
        bar.close()
    _print_cancel(result)
    return _skipped(result.skipped, "cancelled")


def _print_cancel(result: CancelResult) -> None:
    would = "would " if result.dry_run else ""
    if len(result.jobs) <= LIST_LIMIT:
        for j in result.jobs:
            if j.outcome == CANCELLED:
                click.echo(f"{would}cancel job {j.id} (task {j.task_id}, was todo)")
            elif j.outcome == ALREADY:
                click.echo(f"job {j.id} (task {j.task_id}, doing) was being cancelled already")
            else:
                click.echo(
                    f"{would}request cancel of job {j.id} (task {j.task_id}, doing: it ends "
                    "as cancelled when its handler does)"
                )
    for i in result.finished[:LIST_LIMIT]:
        click.echo(f"job {i} has finished; left as it is")
    tail = " (dry run: nothing changed)" if result.dry_run else ""
    verb = "would cancel" if result.dry_run else "cancelled"
    click.echo(f"{verb} {result.count} job(s){tail}")


def job_ids(first: int | None, more: tuple[int, ...]) -> list[int] | None:
    """``--id 3 4 5``: the option's value and the ids after it (None: no --id)."""
    if first is None:
        if more:
            raise UsageError(f"unexpected argument {more[0]}: job ids go after --id")
        return None
    return [first, *more]


def _print_repush(result: RepushResult) -> None:
    verb = "would repush" if result.dry_run else "repushed"
    if result.count <= LIST_LIMIT:
        for j in result.jobs:
            was = j.previous.value if result.dry_run else f"was {j.previous.value}"
            click.echo(f"{verb} job {j.id} (task {j.task_id}, {was})")
    else:
        for task_id, n in result.by_task().items():
            click.echo(f"{verb} {n} job(s) of task {task_id}")
    tail = " (dry run: nothing changed)" if result.dry_run else ""
    click.echo(f"{verb} {result.count} job(s){tail}")


# -- stats ------------------------------------------------------------------------------


@click.command("stats", short_help="Counts by status, oldest todo age and queue depths.")
@click.option("--task", metavar="TASK", help="Only this task.")
@json_option
@table_option
@prefix_option
@common_options
@click.pass_context
def stats(
    ctx: click.Context, task: str | None, as_json: bool, table: str | None, prefix: str | None
) -> int:
    """Counts by status, oldest todo age and queue depth of every task."""
    path = missing_ledger(ctx)
    if path is not None:
        table = check_table_name(table or DEFAULT_TABLE)
        if prefix is not None:
            check_prefix(prefix)
        if task is not None:
            check_task_id(task)
            raise TaskNotFoundError(f"no task {task!r}: {no_ledger(path)}")
        if as_json:
            click.echo(json.dumps({"table": table or DEFAULT_TABLE, "tasks": []}, indent=2))
        else:
            click.echo(f"no jobs in table {table or DEFAULT_TABLE}: {no_ledger(path)}")
        return 0
    admin = admin_for(ctx, table, prefix)
    found: list[TaskSummary] = admin.stats(task)
    if as_json:
        click.echo(
            json.dumps({"table": admin.table, "tasks": [s.to_dict() for s in found]}, indent=2)
        )
        return 0
    if not found:
        click.echo(f"no jobs in table {admin.table}")
        return 0
    headers = [
        "TASK", *(s.value.upper() for s in Status), "OLDEST TODO", "QUEUE", "DELAYED", "QUEUES",
    ]  # fmt: skip
    rows = [
        [
            s.task_id,
            *(str(s.counts.get(st, 0)) for st in Status),
            age(s.oldest_todo_age),
            "-" if s.queue_depth is None else str(s.queue_depth),
            "-" if s.delayed is None else str(s.delayed),
            " ".join(f"{p}={n}" for p, n in s.queues.items()) or "-",
        ]
        for s in found
    ]
    for line in format_table(headers, rows):
        click.echo(line)
    return 0


# -- jobs -------------------------------------------------------------------------------


def need_command(ctx: click.Context) -> None:
    """A group without a command is a one-line usage error (exit 2)."""
    if ctx.invoked_subcommand is None:
        assert isinstance(ctx.command, click.Group)
        names = ", ".join(ctx.command.list_commands(ctx))
        raise click.UsageError(f"missing command: one of {names}", ctx)


@click.group("jobs", invoke_without_command=True, short_help="Inspect jobs.")
@common_options
@click.pass_context
def jobs(ctx: click.Context) -> None:
    """Inspect jobs."""
    need_command(ctx)


@jobs.command("show", short_help="A job's ledger row.")
@click.argument("job_id", type=JOB_ID, metavar="ID")
@click.option("--task", metavar="TASK", help="The job must belong to this task.")
@json_option
@table_option
@common_options
@click.pass_context
def jobs_show(
    ctx: click.Context, job_id: int, task: str | None, as_json: bool, table: str | None
) -> int:
    """A job's ledger row."""
    path = missing_ledger(ctx)
    if path is not None:
        check_table_name(table or DEFAULT_TABLE)
        raise JobNotFoundError(f"no job {job_id}: {no_ledger(path)}")
    rec = admin_for(ctx, table).job(job_id, task)
    data = record_dict(rec)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return 0
    for key in ("payload", "payload_size", "data", "payload_is_json", "result", "result_size"):
        del data[key]
    data["payload"] = _bytes_view(rec.payload)
    data["result"] = _bytes_view(rec.result) if isinstance(rec.result, bytes) else None
    width = max(len(k) for k in data) + 1
    for key, value in data.items():
        shown = "-" if value is None else str(value)
        click.echo(f"{key + ':':<{width}} {shown}")
    return 0


def _clip(text: str, width: int = 1000) -> str:
    return text if len(text) <= width else text[:width] + "…"


def _bytes_view(raw: bytes) -> str:
    """Stored bytes for the eye: as JSON when they are JSON, else as (escaped) text."""
    is_json, value = json_view(raw)
    if is_json:
        return f"{_clip(json.dumps(value, ensure_ascii=False))} ({len(raw)} bytes, JSON)"
    return f"{_clip(repr(raw.decode('utf-8', errors='backslashreplace')))} ({len(raw)} bytes)"


# -- schedules --------------------------------------------------------------------------


@click.group("schedules", invoke_without_command=True, short_help="Cron and periodic schedules.")
@common_options
@click.pass_context
def schedules(ctx: click.Context) -> None:
    """Cron and periodic schedules."""
    need_command(ctx)


@schedules.command("list", short_help="Every schedule and its next fire.")
@click.option("--task", metavar="TASK", help="Only this task's schedules.")
@json_option
@table_option
@common_options
@click.pass_context
def schedules_list(ctx: click.Context, task: str | None, as_json: bool, table: str | None) -> int:
    """Every schedule and its next fire."""
    path = missing_ledger(ctx)
    if path is not None:
        table = check_table_name(table or DEFAULT_TABLE)
        if task is not None:
            check_task_id(task)
        if as_json:
            click.echo(json.dumps({"table": table or DEFAULT_TABLE, "schedules": []}, indent=2))
        else:
            click.echo(f"no schedules in table {table or DEFAULT_TABLE}: {no_ledger(path)}")
        return 0
    admin = admin_for(ctx, table)
    found = admin.schedules(task)
    if as_json:
        data = {"table": admin.table, "schedules": [schedule_dict(s) for s in found]}
        click.echo(json.dumps(data, indent=2))
        return 0
    if not found:
        where = f"task {task}" if task else f"table {admin.table}"
        click.echo(f"no schedules in {where}")
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
            when(s.next_fire_at) if s.next_fire_at else "finished",
            when(s.last_fire_at),
        ]
        for s in found
    ]
    for line in format_table(headers, rows):
        click.echo(line)
    return 0


@schedules.command(
    "remove",
    short_help="Remove a schedule (jobs it made stay).",
    help="Remove a schedule (jobs it made stay). An application that declares it at "
    "start-up declares it again: remove the declaration from the code too.",
)
@click.argument("name", type=SCHEDULE_NAME, metavar="NAME")
@click.option("--task", metavar="TASK", required=True, help="The schedule's task.")
@table_option
@common_options
@click.pass_context
def schedules_remove(ctx: click.Context, name: str, task: str, table: str | None) -> int:
    admin_for(ctx, table).unschedule(task, name)
    click.echo(f"removed schedule {name} of task {task}")
    return 0


@schedules.command("next", short_help="A schedule's next fire times.")
@click.argument("name", type=SCHEDULE_NAME, metavar="NAME")
@click.option("--task", metavar="TASK", required=True, help="The schedule's task.")
@click.option("-n", "count", type=POSITIVE, default=5, metavar="N", help="How many (default 5).")
@json_option
@table_option
@common_options
@click.pass_context
def schedules_next(
    ctx: click.Context, name: str, task: str, count: int, as_json: bool, table: str | None
) -> int:
    """A schedule's next fire times."""
    from ..schedule import zone

    admin = admin_for(ctx, table)
    rec = admin.schedule(task, name)
    fires = admin.next_fires(task, name, count)
    if as_json:
        data = {"task_id": rec.task_id, "name": rec.name, "next": [t.isoformat() for t in fires]}
        click.echo(json.dumps(data, indent=2))
        return 0
    if not fires:
        click.echo(f"schedule {rec.name} of task {rec.task_id} is finished (no fire left)")
        return 0
    local = zone(rec.tz) if rec.tz != "UTC" else None
    for t in fires:
        extra = f"  ({t.astimezone(local).strftime('%Y-%m-%d %H:%M:%S')} {rec.tz})" if local else ""
        click.echo(t.isoformat() + extra)
    return 0


# -- db ---------------------------------------------------------------------------------


@click.group("db", invoke_without_command=True, short_help="Ledger schema migrations.")
@common_options
@click.pass_context
def db(ctx: click.Context) -> None:
    """Ledger schema migrations."""
    need_command(ctx)


def _db_line(state: DbState) -> str:
    current = state.current or "none (not migrated)"
    if state.at_head:
        return f"table {state.table}: {current} (head)"
    return f"table {state.table}: {current} (head is {state.head})"


@db.command("current", short_help="Show the table's revision and the head revision.")
@table_option
@common_options
@click.pass_context
def db_current(ctx: click.Context, table: str | None) -> int:
    """Show the table's revision and the head revision."""
    path = missing_ledger(ctx)
    if path is not None:
        from ..ledger.migrate import head

        name = check_table_name(table or DEFAULT_TABLE)
        click.echo(f"table {name}: none (not migrated: {no_ledger(path)}) (head is {head()})")
        return 0
    click.echo(_db_line(admin_for(ctx, table).db_current()))
    return 0


@db.command("upgrade", short_help="Migrate the table to --revision (default: head).")
@click.option("--revision", metavar="R", help="Target revision (default: head).")
@table_option
@common_options
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str | None, table: str | None) -> int:
    """Migrate the table up to --revision (default: head); creates it if needed."""
    admin = admin_for(ctx, table)
    before = admin.db_current().current
    after = admin.db_upgrade(revision or "head")
    _print_migration(before, after, "upgraded")
    return 0


@db.command("downgrade", short_help="Migrate the table down (base drops it).")
@click.option("--revision", metavar="R", help="Target revision (default: -1, one step down).")
@click.option("--yes", is_flag=True, help="Do not ask before dropping the tables (to base).")
@table_option
@common_options
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str | None, yes: bool, table: str | None) -> int:
    """Migrate the table down to --revision (default: -1). Down to base drops the table
    and every job in it: that asks for confirmation on a terminal, and needs --yes
    without one."""
    admin = admin_for(ctx, table)
    before = admin.db_current().current
    target = revision or "-1"
    if before is not None and not yes and _drops_table(before, target):
        what = f"db downgrade to base drops table {admin.table} and every job in it"
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError(f"{what}: add --yes to confirm (no terminal to ask on)")
        if not click.confirm(f"{what}. Go on?", default=False, err=True):
            click.echo(f"table {admin.table}: left as it is", err=True)
            return 1
    after = admin.db_downgrade(target)
    _print_migration(before, after, "downgraded")
    return 0


def _drops_table(current: str, target: str) -> bool:
    """Whether downgrading from ``current`` to ``target`` reaches base (drops the table)."""
    if target == "base":
        return True
    steps = target[1:] if target.startswith("-") else ""
    if not steps.isdigit():
        return False  # a revision id: never base (Alembic rejects unknown ones)
    from alembic.script import ScriptDirectory

    from ..ledger.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    depth = 0
    rev: Any = script.get_revision(current)
    while rev is not None:
        depth += 1
        down = rev.down_revision
        rev = script.get_revision(down) if isinstance(down, str) else None
    return int(steps) >= depth


def _print_migration(before: str | None, after: DbState, verb: str) -> None:
    if before == after.current:
        click.echo(f"{_db_line(after)}: nothing to do")
    else:
        click.echo(
            f"table {after.table}: {verb} from {before or 'none'} to {after.current or 'none'}"
        )


COMMANDS = [repush, cancel, stats, jobs, schedules, db]
