"""The peer queues ``make bench`` compares meepo with (install them with ``.[bench]``).

One small module per peer (``<name>_peer.py``) implements :class:`base.Peer` in the
configuration its users would pick for no-op jobs on 2 cores; ``driver.py`` measures
any of them the same way (``worker.py`` is the worker process it starts). A peer whose
library is missing or fails is reported as such in the table.
"""

#: peer name -> module under benchmarks.peers, in table order
PEERS = {
    "rq": "rq_peer",
    "celery": "celery_peer",
    "dramatiq": "dramatiq_peer",
    "arq": "arq_peer",
    "huey": "huey_peer",
    "saq": "saq_peer",
    "taskiq": "taskiq_peer",
    "procrastinate": "procrastinate_peer",
}
