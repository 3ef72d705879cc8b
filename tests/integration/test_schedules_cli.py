"""``meepo schedules list|remove|next``, in-process through ``main([...])``, on
SQLite, MariaDB and PostgreSQL (``db_url``)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from support.backends import TaskFactory
from support.cli import after_argv_warning, assert_one_error_line, run

UTC = timezone.utc


def test_unreachable_database_masks_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test"
    code, _, err = run(capsys, "--db", url, "schedules", "list")
    assert code == 1
    line = assert_one_error_line(after_argv_warning(err, "--db"))
    assert "s3cret" not in err and ":***@127.0.0.1:1" in line


def test_list_next_remove(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str
) -> None:
    task = make_task()
    tid = task.task_id
    task.schedule_cron("paris", "0 9 * * *", b"report", tz="Europe/Paris", misfire="skip")
    until = datetime.now(UTC) + timedelta(days=1)
    task.schedule_every("beat", timedelta(minutes=30), b"beat", until=until, priority="low")

    code, out, err = run(capsys, "--db", db_url, "schedules", "list", "--task", tid)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TASK", "NAME", "KIND", "EXPR"]
    assert [ln.split()[1] for ln in lines[1:]] == ["beat", "paris"]
    assert "1800s" in lines[1] and "low" in lines[1]
    assert "0 9 * * *" in lines[2] and "Europe/Paris" in lines[2] and "skip" in lines[2]

    code, out, _ = run(capsys, "--db", db_url, "schedules", "list", "--task", tid, "--json")
    data = json.loads(out)
    assert [s["name"] for s in data["schedules"]] == ["beat", "paris"]
    assert data["schedules"][1]["tz"] == "Europe/Paris"
    assert data["schedules"][0]["until_at"] == until.isoformat()

    code, out, _ = run(
        capsys, "--db", db_url, "schedules", "next", "paris", "--task", tid, "-n", "3"
    )
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert all("09:00:00 Europe/Paris" in ln for ln in lines)
    code, out, _ = run(capsys, "--db", db_url, "schedules", "next", "beat", "--task", tid, "--json")
    fires = [datetime.fromisoformat(t) for t in json.loads(out)["next"]]
    assert fires == task.next_fires("beat", 5)
    assert all(t.minute in (0, 30) and t.second == 0 for t in fires)

    code, out, _ = run(capsys, "--db", db_url, "schedules", "remove", "paris", "--task", tid)
    assert (code, out.strip()) == (0, f"removed schedule paris of task {tid}")
    assert [s.name for s in task.schedules()] == ["beat"]
    code, out, err = run(capsys, "--db", db_url, "schedules", "remove", "paris", "--task", tid)
    assert code == 1 and out == ""
    assert "has no schedule 'paris'" in assert_one_error_line(err)
    code, _, err = run(capsys, "--db", db_url, "schedules", "next", "paris", "--task", tid)
    assert code == 1 and "has no schedule 'paris'" in assert_one_error_line(err)


def test_finished_schedule(
    capsys: pytest.CaptureFixture[str], make_task: TaskFactory, db_url: str
) -> None:
    start = datetime.now(UTC) - timedelta(hours=2)
    task = make_task()
    task.schedule_every("old", 60, b"x", start=start, until=start + timedelta(hours=1))
    code, out, _ = run(capsys, "--db", db_url, "schedules", "list", "--task", task.task_id)
    assert code == 0 and "finished" in out
    code, out, _ = run(capsys, "--db", db_url, "schedules", "next", "old", "--task", task.task_id)
    assert code == 0 and "is finished" in out
