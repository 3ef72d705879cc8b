"""The transport: all Redis. A cache of what the ledger says is ready to run."""

from .transport import CHUNK, PROMOTE_LIMIT, Transport, decode, encode, io_timeout, make_client

__all__ = ["CHUNK", "PROMOTE_LIMIT", "Transport", "decode", "encode", "io_timeout", "make_client"]
