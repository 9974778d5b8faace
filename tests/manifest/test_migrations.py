"""Alembic migrations and opening a manifest: upgrade/downgrade round trips, no drift between the
models and the migrations, a single head, and what opening a manifest does for each schema state.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from uploader.errors import (
    ManifestUnreachableError,
    SchemaAheadError,
    SchemaBehindError,
    UsageError,
)
from uploader.manifest import db
from uploader.manifest.models import METADATA
from uploader.manifest.repo import Manifest

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"segments", "commits", "events"}
INDEXES = {
    "segments": {"ix_segments_unfinished", "ix_segments_state"},
    "commits": {"ix_commits_unfinished"},
    "events": {"ix_events_segment_id"},
}


@pytest.fixture
def engine(manifest_url: str) -> Iterator[Engine]:
    e = db.create_manifest_engine(manifest_url)
    yield e
    e.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def drift(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, METADATA))


def test_upgrade_downgrade_upgrade(engine: Engine) -> None:
    assert tables(engine) == set()
    assert db.current_revision(engine) is None

    db.upgrade(engine)
    assert tables(engine) == TABLES
    assert db.current_revision(engine) == db.head_revision()
    insp = inspect(engine)
    for table, names in INDEXES.items():
        assert names <= {ix["name"] for ix in insp.get_indexes(table)}

    db.downgrade(engine)
    assert tables(engine) == set()
    assert db.current_revision(engine) is None

    db.upgrade(engine)
    assert tables(engine) == TABLES
    assert db.current_revision(engine) == db.head_revision()
    # And the upgraded schema is usable.
    m = Manifest(engine)
    seg = m.register("mig/1", "/data/mig/1", node="n1", part_size=4, worker="w")
    assert m.segment("mig/1") == seg


def test_models_and_migrations_do_not_drift(engine: Engine) -> None:
    db.upgrade(engine)
    assert drift(engine) == []


def test_drift_check_notices_a_difference(engine: Engine) -> None:
    """The comparison is not vacuous: a schema missing an index is reported."""
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_segments_state"))
    diffs: list[Any] = drift(engine)
    assert any(d[0] == "add_index" and d[1].name == "ix_segments_state" for d in diffs), diffs


def test_single_head() -> None:
    script = ScriptDirectory(db.migrations_dir())
    assert len(script.get_heads()) == 1
    assert script.get_heads() == [db.head_revision()]
    # The constant that lets an up-to-date manifest open without importing Alembic.
    assert db.head_revision() == db.HEAD_REVISION, (
        "a migration was added: set uploader.manifest.db.HEAD_REVISION to its revision"
    )
    # The alembic.ini at the repository root points at the same scripts.
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_heads() == [db.head_revision()]
    # Every revision chains back to one base.
    assert len(script.get_bases()) == 1
    assert [r.revision for r in script.walk_revisions()][-1] == script.get_bases()[0]


def test_open_creates_an_embedded_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "manifest.db"
    m = Manifest.open(f"sqlite:///{path}")
    try:
        assert path.exists()
        assert db.current_revision(m.engine) == db.head_revision()
        assert tables(m.engine) == TABLES
        m.register("open/1", "/data/open/1", node="n1", part_size=4, worker="w")
    finally:
        m.close()
    # Opening again is a no-op that keeps the data.
    m = Manifest.open(f"sqlite:///{path}")
    try:
        assert m.segment("open/1") is not None
    finally:
        m.close()


def test_open_upgrades_an_empty_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    m = Manifest.open(f"sqlite:///{path}")
    try:
        assert db.current_revision(m.engine) == db.head_revision()
    finally:
        m.close()


def test_open_refuses_an_empty_postgres_database(pg_url: str) -> None:
    with pytest.raises(SchemaBehindError) as info:
        Manifest.open(pg_url)
    message = str(info.value)
    assert "db upgrade`" in message and "uploader --manifest " in message
    assert pg_url.rpartition("/")[2] in message  # names the database
    # Nothing was created behind the operator's back.
    e = db.create_manifest_engine(pg_url)
    try:
        assert tables(e) == set()
        assert db.current_revision(e) is None
    finally:
        e.dispose()


def test_open_without_auto_upgrade_refuses_a_behind_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/behind.db"
    with pytest.raises(SchemaBehindError, match=r"uploader --manifest \S+ db upgrade"):
        Manifest.open(url, auto_upgrade=False)


def test_open_refuses_tables_without_a_revision(
    manifest_url: str, request: pytest.FixtureRequest
) -> None:
    e = db.create_manifest_engine(manifest_url)
    try:
        METADATA.create_all(e)  # made by hand, not by the migrations
    finally:
        e.dispose()
    with pytest.raises(SchemaBehindError, match="no schema revision"):
        Manifest.open(manifest_url)


def test_open_refuses_a_schema_ahead_of_the_code(manifest_url: str) -> None:
    e = db.create_manifest_engine(manifest_url)
    try:
        db.upgrade(e)
        with e.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
    finally:
        e.dispose()
    with pytest.raises(SchemaAheadError) as info:
        Manifest.open(manifest_url)
    message = str(info.value)
    assert "f00dfeed9999" in message
    assert db.head_revision() in message
    assert "upgrade segment-uploader" in message
    # Not touched: still at the unknown revision.
    e = db.create_manifest_engine(manifest_url)
    try:
        assert db.current_revision(e) == "f00dfeed9999"
    finally:
        e.dispose()


def test_open_a_database_at_head(manifest_url: str) -> None:
    e = db.create_manifest_engine(manifest_url)
    try:
        db.upgrade(e)
    finally:
        e.dispose()
    m = Manifest.open(manifest_url)
    try:
        assert db.current_revision(m.engine) == db.head_revision()
    finally:
        m.close()


def test_a_manifest_at_head_opens_without_importing_alembic(
    engine: Engine, manifest_url: str
) -> None:
    """Alembic is only needed to migrate: the common open (already at head) does not load it."""
    db.upgrade(engine)
    code = (
        "import sys, uploader\n"
        "from uploader.manifest.repo import Manifest\n"
        f"m = Manifest.open({manifest_url!r}); m.close()\n"
        "loaded = sorted(n for n in sys.modules if n == 'alembic' or n.startswith('alembic.'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"alembic was imported: {out.stdout.strip()}"


def test_unreachable_url_names_it_without_the_password() -> None:
    url = "postgresql+psycopg://postgres:s3cretpw@127.0.0.1:1/x"
    with pytest.raises(ManifestUnreachableError) as info:
        Manifest.open(url)
    message = str(info.value)
    assert "127.0.0.1:1/x" in message
    assert "postgres:***@127.0.0.1:1/x" in message
    assert "s3cretpw" not in message
    assert "s3cretpw" not in repr(info.value)
    # Nor in what a traceback would print.
    printed = "".join(traceback.format_exception(info.value))
    assert "s3cretpw" not in printed


def test_unreachable_plain_postgresql_url_uses_psycopg() -> None:
    with pytest.raises(ManifestUnreachableError) as info:
        Manifest.open("postgresql://u:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value)
    assert "u:***@127.0.0.1:1/db" in str(info.value)


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UPLOADER_MANIFEST": url}
    alembic = ROOT / ".venv" / "bin" / "alembic"
    return subprocess.run(
        [str(alembic), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_alembic_cli_upgrade_and_downgrade(manifest_url: str) -> None:
    up = _alembic(manifest_url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    e = db.create_manifest_engine(manifest_url)
    try:
        assert tables(e) == TABLES
        assert db.current_revision(e) == db.head_revision()
        assert drift(e) == []
        down = _alembic(manifest_url, "downgrade", "base")
        assert down.returncode == 0, down.stderr
        assert tables(e) == set()
        assert db.current_revision(e) is None
    finally:
        e.dispose()


def test_a_file_that_is_not_a_database_is_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database, just text " * 100)
    with pytest.raises(ManifestUnreachableError, match=r"notes\.txt"):
        Manifest.open(f"sqlite:///{path}")
    assert path.read_text().startswith("not a database")  # left alone


def test_sqlite_directory_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    url = f"sqlite:///{blocker}/manifest.db"
    with pytest.raises(ManifestUnreachableError, match="a-file"):
        Manifest.open(url)


def test_bad_urls_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="not a SQLAlchemy URL"):
        Manifest.open("not a url")
    with pytest.raises(UsageError) as info:
        Manifest.open("mysql://u:hunter2@db.example/m")
    assert "hunter2" not in str(info.value) and "u:***@db.example/m" in str(info.value)
