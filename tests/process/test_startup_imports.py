"""A worker's start-up imports only what it runs: no Alembic (the schema check reads the
version table with plain SQL), no croniter without a
cron schedule, no CLI command but ``worker``, no SQL dialect but its database's. Checked
in fresh interpreters: ``import meepo`` and ``import meepo.cli``, and a real ``meepo
worker`` process whose handler records ``sys.modules`` while it runs its first job, on
SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.backends import TaskFactory
from support.helpers import child_env, record, wait_for

from meepo import Status

pytestmark = pytest.mark.timeout(120)

#: Never imported by ``import meepo``, ``import meepo.cli`` or a worker's start.
NEVER = (
    "alembic",
    "mako",
    "croniter",
    "rich",
    "meepo.admin",
    "meepo.cli_jobs",
    "meepo.cli.commands",
)

#: The dialects SQLAlchemy ships for the three databases (a worker loads its own only).
DIALECTS = {
    "sqlite": "sqlalchemy.dialects.sqlite",
    "mysql": "sqlalchemy.dialects.mysql",
    "postgresql": "sqlalchemy.dialects.postgresql",
}


def loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    got = subprocess.run(
        [sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert got.returncode == 0, got.stderr
    modules: list[str] = json.loads(got.stdout.splitlines()[-1])
    return modules


@pytest.mark.parametrize("code", ["import meepo", "import meepo.cli", "from meepo import Task"])
def test_importing_meepo_loads_no_migration_async_cron_or_command_modules(code: str) -> None:
    modules = loaded_after(code)
    assert [m for m in NEVER if m in modules] == []
    assert [d for d in DIALECTS.values() if d in modules] == []
    assert "sqlalchemy" in modules and "redis" in modules  # the probe sees imports at all


PROBE_APP = """
import json, os, sys
from meepo import Task

def handle(job):
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(sorted(sys.modules), f)

task = Task(os.environ["PROBE_TASK"], job_func=handle, parallel_num=1)
"""


def test_a_running_worker_has_loaded_only_its_own_dialect_and_nothing_it_does_not_run(
    make_task: TaskFactory, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    producer = make_task()  # the ledger is migrated: the worker only checks it
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    out = tmp_path / "modules.json"
    job = producer.push(b"x")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meepo", "worker", "probe_app:task"],
        cwd=tmp_path,
        env=child_env(
            MEEPO_DB_URL=db_url,
            MEEPO_REDIS_URL=redis_url,
            PROBE_TASK=producer.task_id,
            PROBE_OUT=str(out),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or record(producer, job).status is Status.DONE,
            timeout=60,
            message="the probe job to run",
        )
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    modules = set(json.loads(out.read_text()))
    assert [m for m in NEVER if m in modules] == []
    dialect = producer.engine.dialect.name
    others = [d for name, d in DIALECTS.items() if name != dialect]
    assert [d for d in others if d in modules] == []
    assert DIALECTS[dialect] in modules
