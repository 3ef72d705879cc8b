"""meepo's benchmark suite (``make bench``, ``python -m benchmarks.run --help``).

Layout:

* ``common.py``  backends, the measurement record, the worker-process line protocol, and
  the ``System`` interface every measured queue implements
* ``meepo_bench.py`` meepo through its public API; ``worker.py`` its drain worker process
* ``floor.py``   the floor: meepo's work written directly with SQLAlchemy Core + redis-py,
  unbatched and batched, and its drain worker process
* ``run.py``     the command: runs every system on every backend, prints the table,
  writes ``benchmarks/results/<UTC timestamp>.json`` and ``latest.json``

A peer queue (RQ, Celery, …) is one more ``System`` subclass listed in ``run.SYSTEMS``.
Benchmarks are not tests: nothing here asserts on speed.
"""
