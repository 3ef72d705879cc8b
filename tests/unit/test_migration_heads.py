"""Reading the migrations' revisions without importing them (a worker's start-up)."""

from __future__ import annotations

from pathlib import Path

from meepo.ledger import migrate


def test_the_head_is_the_revision_no_other_follows() -> None:
    revisions = [
        migrate._revisions(p) for p in sorted((migrate.script_location() / "versions").glob("*.py"))
    ]
    followed = set().union(*(f for _, f in revisions))
    heads = {r for r, _ in revisions if r is not None} - followed
    assert heads == {migrate.head()}


def test_a_revision_is_read_from_its_assignment_lines(tmp_path: Path) -> None:
    f = tmp_path / "0002_x.py"
    f.write_text(
        '"""revision = "not this one" (a docstring)"""\n'
        'revision: str = "0002"\n'
        'down_revision: str | None = "0001"\n'
        "def upgrade() -> None:\n    revision = 'local'\n"
    )
    assert migrate._revisions(f) == ("0002", {"0001"})


def test_a_down_revision_over_several_lines_falls_back_to_the_whole_file(tmp_path: Path) -> None:
    f = tmp_path / "0003_merge.py"
    f.write_text('revision = "0003"\ndown_revision = (\n    "0002a",\n    "0002b",\n)\n')
    assert migrate._revisions(f) == ("0003", {"0002a", "0002b"})


def test_a_first_revision_follows_nothing(tmp_path: Path) -> None:
    f = tmp_path / "0001_x.py"
    f.write_text('revision = "0001"\ndown_revision = None\n')
    assert migrate._revisions(f) == ("0001", set())
