"""Which database errors are outages (a daemon waits them out) and which are not (it exits).

Real errors from real databases: an SQLite file locked past the busy timeout, a PostgreSQL
connection terminated by the server, a server that refuses connections; and, not outages, a role
or database that does not exist, a missing table, our own typed errors.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tests.cli.outage_helpers import SqliteLock, pg_conninfo
from tests.manifest.conftest import open_manifest
from uploader.errors import SchemaBehindError, UsageError
from uploader.manifest import db
from uploader.manifest.repo import Manifest


def test_a_lost_or_locked_manifest_is_an_outage(manifest_url: str) -> None:
    if manifest_url.startswith("sqlite"):
        open_manifest(manifest_url).close()
        m = Manifest.open(manifest_url + "?timeout=0.05")
        lock = SqliteLock(Path(db.parse_url(manifest_url).database or ""))
        try:
            with pytest.raises(DBAPIError) as info:
                m.register("k", "/data/k", node="n", part_size=4, worker="w")
        finally:
            lock.release()
        assert "locked" in db.describe(info.value)
    else:
        m = open_manifest(manifest_url)
        with m.engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with psycopg.connect(pg_conninfo(manifest_url), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(DBAPIError) as info:
                conn.execute(text("SELECT 1"))
        assert "administrator command" in db.describe(info.value)
    try:
        assert db.is_outage(info.value)
        assert "\n" not in db.describe(info.value)  # one line, no SQL
        # Once the outage is over the same manifest works (the dead connection was dropped).
        m.register("k2", "/data/k2", node="n", part_size=4, worker="w")
        assert m.segment("k2") is not None
    finally:
        m.close()


def test_configuration_errors_are_not_outages(manifest_url: str, tmp_path: Path) -> None:
    assert not db.is_outage(UsageError("bad URL"))
    assert not db.is_outage(SchemaBehindError("behind"))
    assert not db.is_outage(ValueError("a bug"))
    if manifest_url.startswith("sqlite"):
        with pytest.raises(UsageError, match="timeout"):
            db.create_manifest_engine(f"sqlite:///{tmp_path}/m.db?timeout=soon")
        engine = db.create_manifest_engine(f"sqlite:///{tmp_path}/m.db")
        try:
            with engine.connect() as conn, pytest.raises(DBAPIError) as info:
                conn.execute(text("SELECT * FROM no_such_table"))
        finally:
            engine.dispose()
        assert not db.is_outage(info.value)
        return
    base = manifest_url.rpartition("/")[0]
    for url in (base + "/no_such_database_here", base.replace("postgres@", "nobody@") + "/x"):
        engine = db.create_manifest_engine(url)
        try:
            with pytest.raises(DBAPIError) as info:
                engine.connect().close()
        finally:
            engine.dispose()
        assert not db.is_outage(info.value), db.describe(info.value)
    # A server that refuses connections (down, restarting) is an outage.
    engine = db.create_manifest_engine("postgresql+psycopg://postgres@127.0.0.1:9/x")
    try:
        with pytest.raises(DBAPIError) as info:
            engine.connect().close()
    finally:
        engine.dispose()
    assert db.is_outage(info.value), db.describe(info.value)
