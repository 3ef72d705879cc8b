"""The unit tier runs with no server and no redis-server binary (``make test-fast``): a
test here that asks for a server's fixture is a collection error, not a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SERVER_FIXTURES = {"db_url", "sqlite_url", "redis_url", "make_task", "servers"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        wanted = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if wanted and item.path.is_relative_to(HERE):
            raise pytest.UsageError(
                f"{item.nodeid} uses {', '.join(sorted(wanted))}: a test that needs a "
                "server belongs in tests/integration or tests/process, not tests/unit"
            )
