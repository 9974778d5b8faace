"""Shared fixtures: real PostgreSQL databases, a real moto S3 server over HTTP, remotes.

Every manifest test runs against SQLite and PostgreSQL (``manifest_url``). The PostgreSQL half is
skipped with a clear reason when no server answers, unless ``UPLOADER_TEST_POSTGRES=required``
(set by CI), in which case it fails.
"""

from __future__ import annotations

import os

# moto reads the multipart minimum at import time: lower it before moto is imported anywhere, so
# tests can use small parts. Our own code enforces the same minimum (``min_part_size``).
TEST_MIN_PART_SIZE = 64 * 1024
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(TEST_MIN_PART_SIZE))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

PG_URL = os.environ.get("UPLOADER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_REQUIRED = os.environ.get("UPLOADER_TEST_POSTGRES", "").lower() in ("1", "required", "true")


def _pg_admin_conninfo() -> str:
    return PG_URL.replace("postgresql+psycopg://", "postgresql://")


_pg_status: dict[str, str | None] = {}


def postgres_unavailable() -> str | None:
    """None if PostgreSQL answers, else why not (cached for the session)."""
    if "reason" not in _pg_status:
        try:
            import psycopg

            with psycopg.connect(_pg_admin_conninfo(), connect_timeout=3) as conn:
                conn.execute("select 1")
            _pg_status["reason"] = None
        except Exception as exc:  # pragma: no cover - depends on the machine
            _pg_status["reason"] = f"PostgreSQL at {PG_URL} is not reachable: {exc}"
    return _pg_status["reason"]


def require_postgres() -> None:
    reason = postgres_unavailable()
    if reason is None:
        return
    if PG_REQUIRED:
        pytest.fail(f"{reason} (UPLOADER_TEST_POSTGRES=required)")
    pytest.skip(f"{reason}; set UPLOADER_TEST_PG_URL or start PostgreSQL to run this half")


def create_pg_database() -> str:
    """Create a fresh database; return its SQLAlchemy URL."""
    import psycopg

    name = f"uploader_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_pg_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rpartition("/")[2]
    with psycopg.connect(_pg_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL), dropped afterwards."""
    require_postgres()
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def manifest_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty manifest database URL: SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/manifest.db"
    else:
        require_postgres()
        url = create_pg_database()
        try:
            yield url
        finally:
            drop_pg_database(url)


# --- S3 on moto's standalone server, over HTTP -------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> Iterator[str]:
    """A fresh, empty bucket on the moto server; its name."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture
def s3_remote(moto_endpoint: str, s3_bucket: str) -> tuple[str, dict[str, Any]]:
    """(remote URL, storage_options) for a fresh bucket with a prefix."""
    return f"s3://{s3_bucket}/root", s3_options(moto_endpoint)


@pytest.fixture(params=["s3", "file", "memory"])
def remote(
    request: pytest.FixtureRequest, tmp_path: Any, moto_endpoint: str
) -> tuple[str, dict[str, Any]]:
    """(remote URL, storage_options) for each backend: moto S3, local files, memory."""
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/root", s3_options(moto_endpoint)
    if request.param == "file":
        root = tmp_path / "remote"
        root.mkdir()
        return f"file://{root}", {}
    return f"memory://uploader-test-{uuid.uuid4().hex[:12]}", {}
