"""meepo's types reach a user's ``mypy --strict``: the wheel ships ``py.typed`` (and
every package, ``meepo.cli`` included), and the editable install ``make venv`` makes is
one that mypy can follow (a path, not an import hook)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import ROOT

USER_CODE = """\
from meepo import Task

task = Task("typed")
job_id: int = task.push(b"x")
wrong: str = task.push(b"x")
"""


def test_mypy_strict_on_user_code_sees_meepos_types(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(USER_CODE)
    got = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # Exactly the one error meepo's annotations find: push returns an int.
    assert got.returncode == 1, got.stdout
    assert got.stdout.splitlines()[0] == (
        'user.py:5: error: Incompatible types in assignment (expression has type "int", '
        'variable has type "str")  [assignment]'
    ), got.stdout


def test_the_wheel_ships_py_typed_and_the_cli_package(tmp_path: Path) -> None:
    got = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("meepo/py.typed", "meepo/cli/__init__.py", "meepo/runtime/runner.py"):
        assert name in names
