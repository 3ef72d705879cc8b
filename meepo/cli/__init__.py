"""The ``meepo`` command line (click): thin commands over :mod:`meepo.admin` and ``Task``.

::

    meepo worker MODULE:ATTR [--parallel N] [--job-timeout S] [--max-jobs N] [--max-memory MB]
    meepo repush --id ID [ID ...] | --status failed|todo|doing [--since T] [--until T]
                 [--limit N] [--task T] [--table T] [--prefix P] [--dry-run]
    meepo stats [--task T] [--table T] [--prefix P] [--json]
    meepo jobs show ID [--task T] [--table T] [--json]
    meepo db upgrade|downgrade|current [--table T] [--revision R]
    meepo schedules list [--task T] [--table T] [--json]
    meepo schedules remove NAME --task T [--table T]
    meepo schedules next NAME --task T [-n N] [--table T] [--json]

Connection options (``--db``, ``--redis``, their ``-file`` and ``-password-file`` forms)
and ``-v``/``--log-level`` go before or after the command; without them
``MEEPO_DB_URL`` / ``MEEPO_REDIS_URL`` apply, then the embedded defaults. A password
given in ``--db`` or ``--redis`` draws a warning (``ps`` shows it).

Every failure ends in one line on stderr, ``meepo: error: …`` (passwords in URLs
masked), and a non-zero exit status: 2 for bad input (arguments, names, URLs,
MODULE:ATTR), 1 for everything else (a server down, an unknown job or task, a schema
that needs ``meepo db upgrade``), 130 when interrupted. Never a traceback from meepo.
Shell completion: click's, through ``_MEEPO_COMPLETE`` (docs/cli.md).

``meepo worker`` imports only what a worker runs: the other commands (and the admin
layer, retention and output helpers they use) are imported when one of them is named,
or when help or completion lists them (:class:`MeepoGroup`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from .. import __version__
from ..errors import ConfigError, MeepoError
from .common import (
    PROG,
    UsageError,
    common_options,
    describe,
    fail,
    given,
    parse_time,
    route_logging,
    silence_stdout,
)
from .output import ProgressBar
from .worker import UserCodeError, load_task, worker

__all__ = ["ProgressBar", "UsageError", "cli", "load_task", "main", "parse_time"]


class MeepoGroup(click.Group):
    """The ``meepo`` group: ``worker`` is registered at once, every other command on the
    first lookup of a name other than ``worker`` (or a listing), so that a worker's
    start-up does not import them."""

    _loaded = False

    def load_all(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from ..cli_jobs import register
        from .commands import COMMANDS

        for command in COMMANDS:
            self.add_command(command)
        register(self)  # jobs list/delete, push, purge, stats (meepo/cli_jobs.py)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name != "worker":
            self.load_all()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_all()
        return super().list_commands(ctx)


@click.group(
    PROG,
    cls=MeepoGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
@common_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """meepo: a reliable distributed task queue (SQL ledger + Redis transport)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


cli.add_command(worker)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    restore = route_logging()
    try:
        with cli.make_context(PROG, args) as ctx:
            # A recycled worker runs the same arguments again.
            given(ctx)["argv"] = None if argv is None else list(argv)
            code = cli.invoke(ctx)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else PROG
        return fail(f"{exc.format_message().rstrip('.')} (see `{where} --help`)", 2)
    except click.Abort:
        return fail("interrupted", 130)
    except UsageError as exc:
        return fail(f"{exc}", 2)
    except UserCodeError as exc:  # the user's code: its traceback, then one line
        sys.stderr.write(exc.traceback_text)
        return fail(str(exc), 1)
    except ConfigError as exc:
        return fail(str(exc), 2)
    except MeepoError as exc:
        return fail(str(exc), 1)
    except ValueError as exc:
        return fail(str(exc) or type(exc).__name__, 2)
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except BrokenPipeError:
        silence_stdout()  # `meepo stats | head`: the reader left; not an error to report
        return 1
    except click.ClickException as exc:
        return fail(exc.format_message(), exc.exit_code)
    except Exception as exc:
        return fail(describe(exc), 1)
    finally:
        restore()


def console() -> None:
    """The ``meepo`` console script: shell completion (``_MEEPO_COMPLETE``), then
    :func:`main`."""
    import os

    if os.environ.get(f"_{PROG.upper()}_COMPLETE"):
        cli.main(prog_name=PROG, complete_var=f"_{PROG.upper()}_COMPLETE")
    sys.exit(main())
