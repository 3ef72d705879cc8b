"""What the test tiers share, imported as ``support.*`` (pytest puts ``tests/`` on
``sys.path``, see ``pythonpath`` in pyproject.toml; ``helpers.child_env`` does the same
for the processes the tests start).

* ``support.backends``: the servers' URLs (one database and one Redis db per xdist
  worker), reaching them, ``unique_task_id``;
* ``support.helpers``: waiting on conditions, clocks, throwaway redis-servers, a TCP
  proxy for outages, the environment of a child process;
* ``support.fault_app``, ``support.recycle_app``: worker programs the process tests run.

``tests/conftest.py`` only defines fixtures, from these.
"""

from __future__ import annotations

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
TESTS = SUPPORT.parent
ROOT = TESTS.parent
