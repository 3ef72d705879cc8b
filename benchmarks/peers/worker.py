"""A peer's worker process (``python -m benchmarks.peers.worker PEER``).

Imports the peer module (its library, its app), prints ``ready``, and on ``go`` runs
the peer's own worker loop until the driver ends the process group with SIGTERM (see
``benchmarks/common.py`` for the line protocol).
"""

from __future__ import annotations

import importlib
import sys

from ..common import announce_ready
from . import PEERS
from .base import settings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in PEERS:
        print(f"usage: python -m benchmarks.peers.worker {{{','.join(PEERS)}}}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__}.{PEERS[args[0]]}")
    peer = module.Peer(settings())
    if not announce_ready():
        return 1
    peer.worker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
