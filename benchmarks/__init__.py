"""meepo's benchmark suite (``make bench``, ``python -m benchmarks.run --help``).

Layout:

* ``common.py``  backends, the measurement record, the worker-process line protocol, and
  the ``System`` interface every measured queue implements
* ``meepo_bench.py`` meepo through its public API; ``worker.py`` its drain worker process
* ``floor.py``   the floor: meepo's work written directly with SQLAlchemy Core + redis-py,
  unbatched and batched, and its drain worker process
* ``growth.py``  the growth case: meepo's drain beside a million finished rows
* ``peers/``     the peer queues (RQ, Celery, Dramatiq, arq, Huey, SAQ, Procrastinate),
  one module each, measured by one driver (``peers/driver.py``); ``peers/probe.py`` is
  how their no-op jobs (and meepo's and the floor's, for latency) report that they ran
* ``run.py``     the command: runs every system on every backend, prints the tables,
  the ratios and the targets, writes ``benchmarks/results/<UTC timestamp>.json`` and
  ``latest.json``
Benchmarks are not tests: nothing here asserts on speed.
"""
