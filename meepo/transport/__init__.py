"""The transport: all Redis. A cache of what the ledger says is ready to run."""

from .transport import CHUNK, Transport, decode, encode, make_client

__all__ = ["CHUNK", "Transport", "decode", "encode", "make_client"]
