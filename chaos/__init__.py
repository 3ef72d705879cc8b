"""meepo's chaos harness: a real workload, injected faults, invariants checked at the end.

Run it with ``make chaos`` (or ``python -m chaos.run --help``); see ``chaos/README.md``.
Not part of the test suite: ``tests/`` never imports it.
"""
