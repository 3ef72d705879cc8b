"""Serializers: how a task's payloads and results become the bytes the ledger stores.

``Task(serializer=...)`` takes ``"bytes"`` (the default: payloads are bytes and stay
bytes), ``"json"`` (any JSON value, written as compact UTF-8 JSON) or any object with
``dumps(value) -> bytes`` and ``loads(bytes) -> value``. :func:`serializer_for` checks
the choice; :func:`encode` runs ``dumps`` and turns every failure into a
:class:`~meepo.errors.PayloadError` that says what was wrong and where. No I/O here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError, PayloadError
from .records import JobRecord

log = logging.getLogger("meepo")

__all__ = [
    "BytesSerializer",
    "JsonSerializer",
    "Serializer",
    "check_result",
    "decode_record",
    "encode",
    "encode_result",
    "is_bytes",
    "serializer_for",
]


@runtime_checkable
class Serializer(Protocol):
    """What ``Task(serializer=...)`` accepts besides a name."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class BytesSerializer:
    """Payloads are bytes (``bytearray`` and ``memoryview`` are copied to bytes) and are
    handed to the handler as they are. A result may also be a ``str``: it is stored as
    UTF-8 (and read back as bytes)."""

    name = "bytes"

    def dumps(self, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        raise TypeError(
            f"must be bytes, not {type(value).__name__} (encode it first, or use "
            "Task(serializer='json') for JSON values)"
        )

    def loads(self, data: bytes) -> Any:
        return data

    def __repr__(self) -> str:
        return "BytesSerializer()"


class JsonSerializer:
    """Any JSON value: dicts with string keys, lists (tuples are written as lists),
    strings, finite numbers, booleans and None, written as compact UTF-8 JSON (the form
    ``meepo push --json`` writes). Anything else is a PayloadError naming its type and
    its path, e.g. ``payload["items"][3]: set is not JSON``."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        return self.dumps_at(value, "value")

    def dumps_at(self, value: Any, where: str) -> bytes:
        _check_json(value, where)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)

    def __repr__(self) -> str:
        return "JsonSerializer()"


BYTES = BytesSerializer()
JSON = JsonSerializer()
#: How deep a JSON value may nest (a value that contains itself ends here too).
MAX_DEPTH = 500
_NAMED: dict[str, Serializer] = {"bytes": BYTES, "json": JSON}


def serializer_for(value: object) -> Serializer:
    """``serializer=`` checked: a name (``bytes``, ``json``) or an object with callable
    ``dumps`` and ``loads``; anything else is a ConfigError."""
    if isinstance(value, str):
        got = _NAMED.get(value)
        if got is None:
            raise ConfigError(
                f"serializer must be 'bytes', 'json' or an object with dumps() and loads(), "
                f"not {value!r}"
            )
        return got
    if callable(getattr(value, "dumps", None)) and callable(getattr(value, "loads", None)):
        return value  # type: ignore[return-value]
    raise ConfigError(
        "serializer must be 'bytes', 'json' or an object with dumps(value) -> bytes and "
        f"loads(bytes) -> value, not {type(value).__name__}"
    )


def is_bytes(serializer: Serializer) -> bool:
    return serializer is BYTES


def encode(serializer: Serializer, value: Any, where: str) -> bytes:
    """``serializer.dumps(value)``, or a PayloadError naming ``where`` (``payload``,
    ``payload #3``, ``result``) and what was wrong. The bytes serializer keeps its
    TypeError (as before serializers existed) for a payload that is not bytes."""
    if serializer is BYTES:
        try:
            return BYTES.dumps(value)
        except TypeError as exc:
            raise TypeError(f"{where} {exc}") from None
    if isinstance(serializer, JsonSerializer):
        return serializer.dumps_at(value, where)
    try:
        out = serializer.dumps(value)
    except PayloadError:
        raise
    except Exception as exc:
        raise PayloadError(
            f"{where}: {type(serializer).__name__}.dumps raised {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(out, (bytearray, memoryview)):
        out = bytes(out)
    if not isinstance(out, bytes):
        raise PayloadError(
            f"{where}: {type(serializer).__name__}.dumps returned {type(out).__name__}, not bytes"
        )
    return out


def encode_result(serializer: Serializer, value: Any) -> bytes:
    """A handler's return value as stored bytes: through the serializer, except that the
    bytes serializer also takes a ``str`` (stored as UTF-8). A value it cannot write is
    a PayloadError."""
    if serializer is BYTES:
        if isinstance(value, str):
            return value.encode()
        try:
            return BYTES.dumps(value)
        except TypeError:
            raise PayloadError(
                f"result must be bytes or str with serializer='bytes', not "
                f"{type(value).__name__} (use Task(serializer='json') for JSON values)"
            ) from None
    return encode(serializer, value, "result")


def _check_json(value: Any, where: str) -> None:
    """Walk ``value``; a PayloadError names the first part JSON cannot hold."""
    # Iterative, so that a deeply nested value is a clear error, not a RecursionError.
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        v, path, depth = stack.pop()
        if v is None or isinstance(v, (str, bool, int)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise PayloadError(f"{path}: float {v!r} is not JSON (only finite numbers)")
            continue
        if depth >= MAX_DEPTH:
            raise PayloadError(
                f"{path}: nested more than {MAX_DEPTH} levels deep (or it contains itself)"
            )
        if isinstance(v, (list, tuple)):
            for i in range(len(v) - 1, -1, -1):
                stack.append((v[i], f"{path}[{i}]", depth + 1))
        elif isinstance(v, dict):
            items = list(v.items())
            for k, item in reversed(items):
                if not isinstance(k, str):
                    raise PayloadError(
                        f"{path}: key {k!r} is {type(k).__name__}, not str (JSON object keys "
                        "are strings)"
                    )
                stack.append((item, f"{path}[{json.dumps(k, ensure_ascii=False)}]", depth + 1))
        else:
            raise PayloadError(f"{path}: {type(v).__name__} is not JSON")


def check_result(serializer: Serializer, value: Any, limit: int) -> bytes:
    """A result as stored bytes, no larger than ``limit`` (max_result_bytes); else a
    PayloadError that names the size and the limit."""
    raw = encode_result(serializer, value)
    if len(raw) > limit:
        raise PayloadError(f"result of {len(raw)} bytes exceeds max_result_bytes={limit}")
    return raw


def decode_record(serializer: Serializer, rec: JobRecord) -> JobRecord:
    """``rec`` with ``data`` (the payload) and ``result`` decoded by ``serializer``. A
    value the serializer cannot read (pushed by a task with another serializer, say)
    stays bytes, with a warning in the log."""
    if serializer is BYTES:
        return rec
    data = _loads(serializer, rec.payload, rec, "payload")
    result = rec.result
    if isinstance(result, bytes):
        result = _loads(serializer, result, rec, "result")
    return dataclasses.replace(rec, data=data, result=result)


def _loads(serializer: Serializer, raw: bytes, rec: JobRecord, what: str) -> Any:
    try:
        return serializer.loads(raw)
    except Exception as exc:
        log.warning(
            "task %s: job %d: its %s cannot be read by %r (%s: %s); left as bytes",
            rec.task_id,
            rec.id,
            what,
            serializer,
            type(exc).__name__,
            exc,
        )
        return raw
