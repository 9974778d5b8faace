"""Telling a manifest outage (it passes by waiting: the daemons back off and retry) from a
configuration error (a wrong URL, role or database: they exit), and one line about either.

:mod:`uploader.outage` rides out what :func:`is_outage` accepts; :mod:`uploader.manifest.db`
re-exports both names.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

#: SQLite's primary result codes for "another connection holds the lock" (the busy timeout ran
#: out): SQLITE_BUSY, SQLITE_LOCKED.
_SQLITE_TRANSIENT = {5, 6}
#: SQLSTATE classes and codes that pass: connection exceptions (08), operator intervention
#: (57: admin or crash shutdown, cannot connect now; not 57P04, database dropped), insufficient
#: resources (53: too many connections, ...), serialization failure and deadlock (40001, 40P01),
#: lock not available (55P03).
_PG_TRANSIENT_CLASSES = {"08", "53"}
_PG_TRANSIENT_CODES = {"57P01", "57P02", "57P03", "57014", "40001", "40P01", "55P03"}
#: A connect refused for a reason that will not pass by waiting: the URL names a role or a
#: database that does not exist, or credentials that are refused.
_PG_CONFIG_MESSAGES = (
    "does not exist",
    "authentication failed",
    "pg_hba.conf",
    "no password supplied",
    "permission denied",
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is a manifest outage that passes by waiting: a connection lost or refused
    (a server restarting, pg_terminate_backend, a network cut), a server shutting down or starting
    up, an SQLite file locked by another process past the busy timeout.

    False for everything else, notably configuration errors: a role or database that does not
    exist, refused credentials, and our own typed errors (a bad URL, a schema behind head), which
    are never DBAPI errors.
    """
    if isinstance(exc, PoolTimeoutError):  # every pooled connection stuck in an outage
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:  # SQLAlchemy saw the connection die (is_disconnect)
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in _SQLITE_TRANSIENT
        text_ = str(orig).lower()
        return "locked" in text_ or "busy" in text_
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in _PG_TRANSIENT_CLASSES or sqlstate in _PG_TRANSIENT_CODES
    if isinstance(exc, InterfaceError):  # a connection the driver already knows is closed
        return True
    if isinstance(exc, OperationalError):
        # No SQLSTATE: libpq failed to connect or lost the connection (refused, reset, closed
        # unexpectedly, timeout). Refused for a reason of configuration: not an outage.
        message = str(orig).lower()
        return not any(m in message for m in _PG_CONFIG_MESSAGES)
    return False


def describe(exc: BaseException) -> str:
    """One line about a database error: the driver's first line, without SQL or parameters."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(orig).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{type(orig).__name__}: {first}" if first else type(orig).__name__
