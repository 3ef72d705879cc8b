"""Column types shared by the runtime schema and the Alembic migrations.

The MySQL and PostgreSQL types are imported when a dialect asks for them, not with this
module: a worker on one server never loads the other's dialect (start-up time)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, LargeBinary
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

UTC = timezone.utc

#: A 64-bit auto-increment id; SQLite only auto-increments an INTEGER PRIMARY KEY.
JobId = BigInteger().with_variant(Integer(), "sqlite")


class PayloadBytes(TypeDecorator[bytes]):
    """Payload bytes: MySQL's BLOB stops at 64 KiB, so LONGBLOB there."""

    impl = LargeBinary()
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.LONGBLOB())
        return dialect.type_descriptor(LargeBinary())


#: Payload bytes (:class:`PayloadBytes`).
Payload = PayloadBytes()


class ResultBytes(TypeDecorator[bytes]):
    """A stored result (max_result_bytes is at most 16 MiB - 1): MEDIUMBLOB on MySQL,
    BYTEA on PostgreSQL, BLOB on SQLite."""

    impl = LargeBinary()
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.MEDIUMBLOB())
        return dialect.type_descriptor(LargeBinary())


#: A stored result (:class:`ResultBytes`).
Result = ResultBytes()


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; MySQL/MariaDB ``DATETIME(6)`` and SQLite text hold
    naive UTC. Binding a naive datetime is a ValueError: meepo never guesses a zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "mysql":
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        if dialect.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: meepo needs timezone-aware datetimes")
        value = value.astimezone(UTC)
        if dialect.name == "postgresql":
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
