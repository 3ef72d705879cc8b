"""The transport: all Redis. A cache of what the ledger says is ready to run."""

from .transport import (
    MESSAGES_PER_CALL,
    PROMOTE_LIMIT,
    Transport,
    decode,
    encode,
    io_timeout,
    make_client,
)

__all__ = [
    "MESSAGES_PER_CALL",
    "PROMOTE_LIMIT",
    "Transport",
    "decode",
    "encode",
    "io_timeout",
    "make_client",
]
