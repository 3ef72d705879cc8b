"""The command line in-process, before anything connects: usage errors are one line
naming the problem (exit 2), times parse, the progress bar draws only on a terminal, and
docs/cli.md names every command and option."""

from __future__ import annotations

import io

import pytest
from support import ROOT
from support.cli import after_argv_warning, assert_one_error_line, run

from meepo.cli import ProgressBar, parse_time


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["repush"], "one of --id or --status is required"),
        (["repush", "--status", "bogus"], "unknown status 'bogus'"),
        (["repush", "--status", "done"], "unknown status 'done'"),
        (["repush", "--id", "1", "x"], "invalid job id 'x'"),
        (["repush", "--id", "0"], "invalid job id '0'"),
        (["repush", "--id", "1", "--status", "failed"], "not allowed with"),
        (["repush", "--id", "1", "--limit", "5"], "go with --status"),
        (["repush", "--status", "failed", "--since", "yesterday"], "invalid time 'yesterday'"),
        (["repush", "--status", "failed", "--limit", "-3"], "--limit"),
        (["repush", "--status", "failed", "--since", "1h", "--until", "2h"], "before --until"),
        (["jobs", "show", "abc"], "invalid job id 'abc'"),
        (["jobs"], "missing command: one of delete, list, show"),
        (["db", "sideways"], "No such command 'sideways'"),
        (["stats", "--table", "bad-name;drop"], "invalid table name"),
        (["stats", "--prefix", "{x}"], "invalid list name prefix"),
        (["worker"], "Missing argument 'MODULE[:ATTR]...'"),
        (["worker", "nocolon_zq81"], "no module named 'nocolon_zq81'"),
        (["worker", "nosuch_mod_zq81:task"], "no module named 'nosuch_mod_zq81'"),
        (["worker", "app:task", "--parallel", "0"], "--parallel"),
        (["worker", "app:task", "--job-timeout", "soon"], "--job-timeout"),
        (["worker", "app:task", "--job-timeout", "0"], "positive number of seconds"),
        (["worker", "app:task", "--max-jobs", "0"], "--max-jobs"),
        (["worker", "app:task", "--max-memory", "lots"], "--max-memory"),
        (["stats", "--nope"], "No such option '--nope'"),
        (["schedules"], "missing command: one of"),
        (["schedules", "next", "x"], "Missing option '--task'"),
        (["schedules", "remove", "x"], "Missing option '--task'"),
        (["schedules", "remove", "bad name", "--task", "t"], "invalid schedule name 'bad name'"),
        (["schedules", "next", "x", "--task", "t", "-n", "0"], "-n"),
        (["schedules", "next", "x", "--task", "bad task!"], "invalid task id"),
        (["schedules", "list", "--task", "bad task!"], "invalid task id"),
        (["schedules", "list", "--table", "no-such;table"], "invalid table name"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert needle in assert_one_error_line(err)


def test_bad_database_url_masks_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "db", "current", "--db", "nonsense://u:s3cret@h/x")
    assert code == 2
    line = assert_one_error_line(after_argv_warning(err, "--db"))
    assert "s3cret" not in err and "u:***@h" in line


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_large_sets() -> None:
    tty = _Tty()
    bar = ProgressBar(tty, "repushing", threshold=1000)
    bar(500, 600)
    assert tty.getvalue() == ""
    bar(1000, 3000)
    bar(3000, 3000)
    bar.close()
    drawn = tty.getvalue()  # click's bar, redrawn on one line
    assert drawn.rstrip().endswith("[" + "#" * 36 + "]  3000/3000\x1b[?25h")
    assert "1000/3000" in drawn and drawn.lstrip("\r").startswith("\x1b[?25lrepushing")
    plain = io.StringIO()
    bar = ProgressBar(plain, "repushing", threshold=10)
    bar(1000, None)
    bar.close()
    assert plain.getvalue() == ""


def test_parse_time() -> None:
    from datetime import datetime, timedelta, timezone

    now = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("90s", now) == now - timedelta(seconds=90)
    assert parse_time("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert parse_time("2024-05-01 10:00") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert parse_time("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)


def test_docs_cli_md_names_every_command_and_option() -> None:
    """docs/cli.md is the reference: every command, subcommand and option is in it."""
    import click

    from meepo.cli import cli

    text = (ROOT / "docs" / "cli.md").read_text()
    missing: list[str] = []

    def walk(command: click.Command, path: str) -> None:
        if f"meepo {path}".strip() not in text and path:
            missing.append(path)
        for param in command.params:
            if isinstance(param, click.Option):
                missing.extend(f"{path}: {o}" for o in param.opts if f"`{o}" not in text)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}".strip())

    cli.load_all()  # the commands a worker's start-up does not import
    walk(cli, "")
    assert not missing, missing
