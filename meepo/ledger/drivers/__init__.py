"""One ledger driver per server, behind :class:`~meepo.ledger.driver.LedgerDriver`.

* ``portable.py``: SQLAlchemy Core, any supported dialect (SQLite, and servers through
  drivers the others do not cover);
* ``postgres.py``: PostgreSQL through psycopg 3;
* ``mysql.py``: MariaDB/MySQL.

:func:`driver_for` picks one for an engine; see ``docs/drivers.md``.
"""

from __future__ import annotations

from sqlalchemy import Engine

from ...errors import ConfigError
from ..driver import LedgerDriver
from .mysql import MySQLDriver
from .portable import PortableDriver
from .postgres import PostgresDriver

DRIVERS: dict[str, type[PortableDriver]] = {
    "portable": PortableDriver,
    "postgres": PostgresDriver,
    "mysql": MySQLDriver,
}


def driver_for(engine: Engine, table_name: str, name: str | None = None) -> LedgerDriver:
    """The driver for ``engine``'s server, or the one called ``name`` (the conformance
    suite runs the portable driver on every server)."""
    if name is not None:
        if name not in DRIVERS:
            raise ConfigError(f"unknown ledger driver {name!r}; choose one of {sorted(DRIVERS)}")
        return DRIVERS[name](engine, table_name)
    if PostgresDriver.usable(engine):
        return PostgresDriver(engine, table_name)
    if engine.dialect.name == "mysql":
        return MySQLDriver(engine, table_name)
    return PortableDriver(engine, table_name)


__all__ = ["DRIVERS", "MySQLDriver", "PortableDriver", "PostgresDriver", "driver_for"]
