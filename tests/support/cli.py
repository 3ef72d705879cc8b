"""Running ``meepo`` in-process through ``main([...])`` and reading its one-line errors."""

from __future__ import annotations

import pytest

from meepo.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``meepo ARGV...`` in this process: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str) -> str:
    """The one ``meepo: error:`` line that ``err`` must be (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("meepo: error: "), err
    assert "Traceback" not in err
    return lines[0]


def after_argv_warning(err: str, option: str) -> str:
    """``err`` without its first line, the warning about a password in ``option``."""
    first, _, rest = err.partition("\n")
    assert first.startswith(f"meepo: warning: the {option} URL holds a password"), err
    return rest
