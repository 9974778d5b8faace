"""Shared fixtures: real PostgreSQL databases, a real moto S3 server over HTTP, remotes.

Every manifest test runs against SQLite and PostgreSQL (``manifest_url``). The PostgreSQL half is
skipped with a clear reason when no server answers, unless ``UPLOADER_TEST_POSTGRES=required``
(set by CI), in which case it fails.

S3 runs on moto's server; the storage contract suite and the end-to-end recovery tests also run on
Ceph RGW (the ``rgw`` remote) when it answers at ``UPLOADER_TEST_RGW_ENDPOINT`` (default
http://127.0.0.1:7480, as started by ``../shared/s3/start-rgw.sh``). Skipped with the reason when
absent, failed when ``UPLOADER_TEST_RGW=required`` (set by CI).
"""

from __future__ import annotations

import functools
import json
import os

# moto reads the multipart minimum at import time: lower it before moto is imported anywhere, so
# tests can use small parts. Our own code enforces the same minimum (``min_part_size``).
TEST_MIN_PART_SIZE = 64 * 1024
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(TEST_MIN_PART_SIZE))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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


def _admin() -> Any:
    import psycopg

    return psycopg.connect(_pg_admin_conninfo(), autocommit=True)


def create_pg_database(template: str | None = None) -> str:
    """Create a fresh database (a copy of ``template`` if given); return its SQLAlchemy URL.

    Test databases commit asynchronously (``synchronous_commit = off``): a test never survives a
    crash of the shared server, so waiting for each commit's WAL flush would only cost time. The
    code under test keeps its own settings; the private clusters of the outage tests are untouched.
    """
    name = f"uploader_test_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rpartition("/")[2]
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _pg_dropper() -> Iterator[ThreadPoolExecutor]:
    """Drops test databases off the tests' path (a DROP costs about as much as a test's setup);
    all are dropped before the session ends."""
    with ThreadPoolExecutor(1, thread_name_prefix="drop-test-db") as pool:
        yield pool


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL), dropped afterwards."""
    require_postgres()
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def migrate(url: str) -> None:
    """What an operator runs once per database (``uploader db upgrade``): the manifest at head."""
    from uploader.manifest import db

    engine = db.create_manifest_engine(url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def sqlite_at_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite manifest migrated to head per session; tests that need one get a copy."""
    path = tmp_path_factory.mktemp("template") / "manifest.db"
    migrate(f"sqlite:///{path}")
    # Closed cleanly, the write-ahead log is checkpointed into the file and removed: the one file
    # is the whole database.
    assert not path.with_name("manifest.db-wal").exists()
    return path


@pytest.fixture(scope="session")
def pg_at_head() -> Iterator[str]:
    """One PostgreSQL database migrated to head per session, the template of tests' databases."""
    require_postgres()
    url = create_pg_database()
    migrate(url)
    try:
        yield url.rpartition("/")[2]
    finally:
        drop_pg_database(url)


@pytest.fixture
def at_head() -> None:
    """Asked for beside ``manifest_url``: the manifest starts migrated to head, as an operator's
    ``uploader db upgrade`` leaves it (see ``MIGRATING_FIXTURES``)."""


#: Fixtures that migrate the test's manifest before anything else touches it: for their tests the
#: manifest starts as a copy of one migrated once per session (running the migrations for each of
#: ~1,000 tests cost more than most of the tests themselves). Every other test gets an empty one.
MIGRATING_FIXTURES = frozenset({"make_store", "manifest", "at_head"})


@pytest.fixture(params=["sqlite", "postgresql"])
def manifest_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A manifest database URL: SQLite file, then PostgreSQL. Empty, or at head (a copy of a
    migrated template) when the test uses a fixture of ``MIGRATING_FIXTURES``."""
    at_head = not MIGRATING_FIXTURES.isdisjoint(request.fixturenames)
    if request.param == "sqlite":
        path = tmp_path / "manifest.db"
        if at_head:
            shutil.copyfile(request.getfixturevalue("sqlite_at_head"), path)
        yield f"sqlite:///{path}"
    else:
        require_postgres()
        template = request.getfixturevalue("pg_at_head") if at_head else None
        dropper: ThreadPoolExecutor = request.getfixturevalue("_pg_dropper")
        url = create_pg_database(template)
        try:
            yield url
        finally:
            dropper.submit(drop_pg_database, url)


# --- A plain fsspec reader of a remote (not our storage layer) --------------------------------


@functools.cache
def _plain_fs(protocol: str, options_json: str) -> Any:
    import fsspec

    return fsspec.filesystem(protocol, skip_instance_cache=True, **json.loads(options_json))


def remote_fs(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """(filesystem, root) of a remote, read and written with plain fsspec, as another program
    would. One filesystem per server and options for the session: making an s3fs filesystem makes
    an aiobotocore client (botocore's S3 model loaded again), which cost more than most reads. Its
    listing cache is dropped before every answer, so nothing stale is seen."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    fs = _plain_fs(protocol, json.dumps(options, sort_keys=True))
    fs.invalidate_cache()
    return fs, fs._strip_protocol(url)


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


@pytest.fixture(scope="session")
def moto_client(moto_endpoint: str) -> Any:
    """One boto3 client for the session's moto server (making one loads botocore's S3 model:
    about 0.1 s of CPU, which every test that needs a bucket would pay again)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture
def s3_bucket(moto_client: Any) -> Iterator[str]:
    """A fresh, empty bucket on the moto server; its name."""
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    moto_client.create_bucket(Bucket=name)
    yield name


@pytest.fixture
def s3_remote(moto_endpoint: str, s3_bucket: str) -> tuple[str, dict[str, Any]]:
    """(remote URL, storage_options) for a fresh bucket with a prefix."""
    return f"s3://{s3_bucket}/root", s3_options(moto_endpoint)


# --- S3 on Ceph RGW (a real S3 implementation that differs from moto) --------------------------

RGW_ENDPOINT = os.environ.get("UPLOADER_TEST_RGW_ENDPOINT", "http://127.0.0.1:7480")
# start-rgw.sh's defaults (a throwaway loopback server: these are not secrets).
RGW_ACCESS_KEY = os.environ.get("UPLOADER_TEST_RGW_ACCESS_KEY", "TESTACCESSKEY0000001")
RGW_SECRET_KEY = os.environ.get(
    "UPLOADER_TEST_RGW_SECRET_KEY", "testsecretkey0000000000000000000000000001"
)
#: start-rgw.sh's ceph.conf: used only to lower the part minimum (below) when RGW refuses our parts.
RGW_CEPH_CONF = os.environ.get(
    "UPLOADER_TEST_RGW_CEPH_CONF",
    os.path.join(os.environ.get("CEPH_RGW_DIR", "/tmp/ceph-rgw"), "ceph.conf"),
)
RGW_REQUIRED = os.environ.get("UPLOADER_TEST_RGW", "").lower() in ("1", "required", "true")

_rgw_status: dict[str, str | None] = {}


def rgw_options() -> dict[str, Any]:
    return {
        "key": RGW_ACCESS_KEY,
        "secret": RGW_SECRET_KEY,
        "endpoint_url": RGW_ENDPOINT,
        "client_kwargs": {"region_name": "us-east-1"},
    }


@functools.cache
def _rgw_client() -> Any:
    """One client per session (making one loads botocore's S3 model, ~0.1 s of CPU)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=RGW_ENDPOINT,
        aws_access_key_id=RGW_ACCESS_KEY,
        aws_secret_access_key=RGW_SECRET_KEY,
        region_name="us-east-1",
        config=Config(connect_timeout=3, read_timeout=30, retries={"total_max_attempts": 1}),
    )


def _rgw_takes_small_parts(client: Any) -> bool:
    """Whether RGW completes an upload whose first part is TEST_MIN_PART_SIZE bytes.

    RGW's own minimum (``rgw_multipart_min_part_size``) is 5 MiB, like AWS; the suite uses 64 KiB
    parts (moto's minimum is lowered the same way, above) to stay fast.
    """
    from botocore.exceptions import ClientError

    bucket = f"probe-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        upload = client.create_multipart_upload(Bucket=bucket, Key="p")["UploadId"]
        parts = []
        for n, body in ((1, b"a" * TEST_MIN_PART_SIZE), (2, b"b")):
            etag = client.upload_part(
                Bucket=bucket, Key="p", UploadId=upload, PartNumber=n, Body=body
            )["ETag"]
            parts.append({"PartNumber": n, "ETag": etag})
        try:
            client.complete_multipart_upload(
                Bucket=bucket, Key="p", UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "EntityTooSmall":
                client.abort_multipart_upload(Bucket=bucket, Key="p", UploadId=upload)
                return False
            raise
        client.delete_object(Bucket=bucket, Key="p")
        return True
    finally:
        client.delete_bucket(Bucket=bucket)


def _lower_rgw_part_minimum() -> str | None:
    """Lower RGW's part minimum to the suite's (a runtime setting of the test cluster); None if
    done, else why not."""
    ceph = shutil.which("ceph")
    if ceph is None or not os.path.exists(RGW_CEPH_CONF):
        return f"no ceph CLI or no {RGW_CEPH_CONF}"
    done = subprocess.run(
        [
            ceph,
            "-c",
            RGW_CEPH_CONF,
            "--connect-timeout",
            "10",
            "config",
            "set",
            "client.rgw.x",
            "rgw_multipart_min_part_size",
            str(TEST_MIN_PART_SIZE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        return f"ceph config set failed: {done.stderr.strip()[:300]}"
    return None


def _probe_rgw() -> str | None:
    client = _rgw_client()
    client.list_buckets()
    if _rgw_takes_small_parts(client):
        return None
    why = _lower_rgw_part_minimum()
    if why is None and _rgw_takes_small_parts(client):
        return None
    return (
        f"Ceph RGW at {RGW_ENDPOINT} refuses {TEST_MIN_PART_SIZE}-byte parts "
        f"(EntityTooSmall; {why or 'still after lowering it'}): run `ceph -c "
        f"{RGW_CEPH_CONF} config set client.rgw.x rgw_multipart_min_part_size "
        f"{TEST_MIN_PART_SIZE}`"
    )


def rgw_unavailable() -> str | None:
    """None if RGW answers and takes the suite's part size, else why not (cached per session).

    The xdist workers probe one at a time (a file lock): four at once, each creating a bucket and
    possibly reconfiguring the cluster, once kept one of them waiting past its read timeout, and
    that worker then failed every RGW test. A probe that fails on the way is tried again (3
    times) before RGW is called unusable."""
    if "reason" not in _rgw_status:
        import fcntl
        import tempfile

        reason: str | None = None
        lock_path = os.path.join(tempfile.gettempdir(), "uploader-tests-rgw-probe.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for attempt in range(3):
                try:
                    reason = _probe_rgw()
                    break
                except Exception as exc:  # pragma: no cover - depends on the machine
                    reason = (
                        f"Ceph RGW at {RGW_ENDPOINT} is not usable (3 probes): "
                        f"{type(exc).__name__}: {exc}; start it with ../shared/s3/start-rgw.sh "
                        "(or set UPLOADER_TEST_RGW_ENDPOINT, UPLOADER_TEST_RGW_ACCESS_KEY, "
                        "UPLOADER_TEST_RGW_SECRET_KEY)"
                    )
                    if attempt < 2:
                        threading.Event().wait(2.0)  # RGW busy: give it a moment
        _rgw_status["reason"] = reason
    return _rgw_status["reason"]


def require_rgw() -> None:
    reason = rgw_unavailable()
    if reason is None:
        return
    if RGW_REQUIRED:
        pytest.fail(f"{reason} (UPLOADER_TEST_RGW=required)")
    pytest.skip(reason)


@pytest.fixture
def rgw_bucket() -> Iterator[str]:
    """A fresh, empty bucket on RGW; emptied and removed afterwards (RGW keeps its data in memory)."""
    require_rgw()
    client = _rgw_client()
    name = f"bucket-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        _empty_and_delete(client, name)


def _empty_and_delete(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for u in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=o["Key"])
    client.delete_bucket(Bucket=bucket)


def make_remote(
    request: pytest.FixtureRequest, kind: str, tmp_path: Any
) -> tuple[str, dict[str, Any]]:
    """(remote URL, storage_options) of one backend: "s3" (moto), "rgw", "file" or "memory"."""
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/root", s3_options(request.getfixturevalue("moto_endpoint"))
    if kind == "rgw":
        bucket = request.getfixturevalue("rgw_bucket")
        return f"s3://{bucket}/root", rgw_options()
    if kind == "file":
        root = tmp_path / "remote"
        root.mkdir()
        return f"file://{root}", {}
    assert kind == "memory", kind
    return f"memory://uploader-test-{uuid.uuid4().hex[:12]}", {}


#: The backends of ``remote``; modules that also run on RGW override ``remote`` with these.
REMOTES = ("s3", "file", "memory")
REMOTES_WITH_RGW = ("s3", "rgw", "file", "memory")


@pytest.fixture(params=REMOTES)
def remote(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """(remote URL, storage_options) for each backend: moto S3, local files, memory."""
    return make_remote(request, request.param, tmp_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """RGW runs with the SQLite manifest only: the manifest's PostgreSQL half adds nothing about the
    S3 server and would double the RGW tests' time (the suite must stay fast on 2 cores)."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("remote") == "rgw" and params.get("manifest_url") == "postgresql":
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def md5(x: Any) -> str:
    """The MD5 of an md5-mode part or payload (None only in the crc32c checksum mode)."""
    value = x.md5
    assert isinstance(value, str), f"{x!r} has no MD5 (crc32c checksum mode)"
    return value
