"""Shared pieces: the S3 servers (moto over HTTP, Ceph RGW), clients, timing, result tables."""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@dataclass
class Result:
    name: str
    measurements: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Per ratio measured in several rounds: (min, max) of the rounds; the ratio is their median.
    spreads: dict[str, tuple[float, float]] = field(default_factory=dict)

    def show(self) -> None:
        print(f"\n== {self.name}")
        for k, v in self.measurements.items():
            print(f"  {k:<48} {v:12.3f}")
        for k, v in self.ratios.items():
            target = self.targets.get(k, "")
            spread = self.spreads.get(k)
            shown = f"[{spread[0]:.2f}..{spread[1]:.2f}]" if spread else ""
            print(f"  ratio {k:<42} {v:12.2f} {shown:>13}  {target}")
        for n in self.notes:
            print(f"  note: {n}")


@dataclass(frozen=True)
class Server:
    """One S3 server of the run: its endpoint, credentials and the processes that serve it."""

    name: str
    url: str
    key: str
    secret: str
    pids: tuple[int, ...]


#: Servers by endpoint URL (clients look their credentials up here), and the one in use now,
#: whose processes' CPU time is reported next to each client's.
SERVERS: dict[str, Server] = {}
CURRENT: Server | None = None


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def server_cpu() -> float:
    """CPU seconds (user + system) the current server's processes have used so far; 0 if unknown."""
    if CURRENT is None:
        return 0.0
    return sum(_cpu_of(pid) for pid in CURRENT.pids)


def client_cpu() -> float:
    """CPU seconds (user + system) this process has used so far."""
    t = os.times()
    return t.user + t.system


def timed_both(fn: Callable[[], object]) -> tuple[float, float, float]:
    """Wall seconds of ``fn``, the server's CPU seconds and this process's CPU seconds meanwhile."""
    s0, c0 = server_cpu(), client_cpu()
    wall = timed(fn)
    return wall, server_cpu() - s0, client_cpu() - c0


@dataclass
class Rounds:
    """Each client's wall, server-CPU and client-CPU seconds, one entry per round."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    server: dict[str, list[float]] = field(default_factory=dict)
    client: dict[str, list[float]] = field(default_factory=dict)

    def of(self, what: str) -> dict[str, list[float]]:
        table: dict[str, list[float]] = getattr(self, what)
        return table

    def median(self, name: str, what: str = "wall") -> float:
        return statistics.median(self.of(what)[name])

    def ratio(self, res: Result, label: str, num: str, den: str, what: str = "wall") -> None:
        """Put the per-round ratio ``num / den`` into ``res``: its median, and its spread."""
        values = [a / b for a, b in zip(self.of(what)[num], self.of(what)[den], strict=True)]
        res.ratios[label] = statistics.median(values)
        if len(values) > 1:
            res.spreads[label] = (min(values), max(values))


def alternate(
    clients: dict[str, Callable[[int], object]],
    rounds: int,
    between: Callable[[], None] | None = None,
) -> Rounds:
    """Run every client once per round, in an order rotated from round to round (so none always
    runs first, on a cold server, or last), ``between`` after each round (not timed).

    One run of each client is noise on two shared cores (the same seal moved by +-0.2x between
    identical runs), so the benchmarks report each ratio's median over rounds with its spread.
    """
    out = Rounds()
    names = list(clients)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, server, client = timed_both(functools.partial(clients[name], r))
            out.wall.setdefault(name, []).append(wall)
            out.server.setdefault(name, []).append(server)
            out.client.setdefault(name, []).append(client)
        if between is not None:
            between()
    return out


@contextmanager
def using(server: Server) -> Iterator[str]:
    """Make ``server`` the current one (for CPU accounting); yield its endpoint."""
    global CURRENT
    SERVERS[server.url] = server
    CURRENT = server
    try:
        yield server.url
    finally:
        CURRENT = None


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's standalone server in its own process, like a real remote (no shared GIL)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(5 * MiB))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("moto server did not start")
        with using(Server("moto", url, "bench", "bench", (proc.pid,))) as endpoint:
            yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


RGW_URL = os.environ.get("UPLOADER_BENCH_RGW", "http://127.0.0.1:7480")
RGW_DIR = Path(os.environ.get("CEPH_RGW_DIR", "/tmp/ceph-rgw"))
#: ../shared/s3 next to the project: the script that starts a throwaway Ceph RGW (memstore).
RGW_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "s3" / "start-rgw.sh"


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=2).read()
    except urllib.error.HTTPError:
        return True  # an S3 error document is an answer
    except OSError:
        return False
    return True


@contextmanager
def rgw_server() -> Iterator[str]:
    """Ceph RGW on 127.0.0.1:7480, started by ../shared/s3/start-rgw.sh when it is not up.

    The server's CPU is that of radosgw and the memstore OSD that holds the bytes (plus the monitor
    and manager, which idle).
    """
    import subprocess

    if not _answers(RGW_URL):
        if not RGW_SCRIPT.exists():
            raise RuntimeError(f"Ceph RGW does not answer at {RGW_URL} and {RGW_SCRIPT} is missing")
        print(f"starting Ceph RGW with {RGW_SCRIPT} (about 25 s)", flush=True)
        subprocess.run(["bash", str(RGW_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    pids: set[int] = set()  # the script writes some daemons' pids twice (<name>.pid, <name>.fg.pid)
    for f in sorted((RGW_DIR / "run").glob("*.pid")):
        try:
            pids.add(int(f.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    key = os.environ.get("RGW_ACCESS_KEY", "TESTACCESSKEY0000001")
    secret = os.environ.get("RGW_SECRET_KEY", "testsecretkey0000000000000000000000000001")
    with using(Server("rgw", RGW_URL, key, secret, tuple(sorted(pids)))) as endpoint:
        yield endpoint


def _credentials(endpoint: str) -> tuple[str, str]:
    server = SERVERS.get(endpoint)
    return (server.key, server.secret) if server else ("bench", "bench")


def s3_options(endpoint: str) -> dict[str, Any]:
    key, secret = _credentials(endpoint)
    return {
        "key": key,
        "secret": secret,
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }


def boto3_client(endpoint: str) -> Any:
    import boto3

    key, secret = _credentials(endpoint)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )


_made: dict[str, list[str]] = {}


def new_bucket(endpoint: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    boto3_client(endpoint).create_bucket(Bucket=name)
    _made.setdefault(endpoint, []).append(name)
    return name


def drop_buckets(endpoint: str) -> None:
    """Empty and remove the buckets this run made on ``endpoint``: Ceph RGW's memstore keeps every
    byte in memory (a full run leaves several GiB in its OSD otherwise)."""
    client = boto3_client(endpoint)
    for bucket in _made.pop(endpoint, []):
        _empty(client, bucket)
        client.delete_bucket(Bucket=bucket)
    _collect_garbage(endpoint)


def empty_bucket(endpoint: str, bucket: str) -> None:
    """Remove every object and unfinished upload of ``bucket`` (between rounds: see drop_buckets)."""
    _empty(boto3_client(endpoint), bucket)
    _collect_garbage(endpoint)


def _empty(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for u in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _collect_garbage(endpoint: str) -> None:
    server = SERVERS.get(endpoint)
    if server is not None and server.name == "rgw":
        _rgw_collect_garbage()


def _rgw_collect_garbage() -> None:
    """RGW frees a deleted object's data only when its garbage collector runs (two hours after
    the delete by default): run it now, so the memstore gets the memory back."""
    import shutil
    import subprocess

    admin = shutil.which("radosgw-admin")
    conf = RGW_DIR / "ceph.conf"
    if admin is None or not conf.exists():
        return
    subprocess.run(
        [admin, "-c", str(conf), "-n", "client.admin", "gc", "process", "--include-all"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_file(path: Path, size: int, seed: int = 0) -> None:
    """A file of pseudo-random bytes, written in 8 MiB chunks (never all in memory)."""
    import random

    rng = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rng.randbytes(n))
            left -= n


#: The manifest of the stores the throughput benchmarks open (``--manifest``): "sqlite", a file
#: in the run's directory, or "postgresql", a new database on the local server for each store.
MANIFEST = "sqlite"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
_PG_DATABASES: list[str] = []


def new_pg_database() -> str:
    """The URL of a new, empty database on the local PostgreSQL server (psycopg's
    ``OperationalError`` if the server is not there); drop it with :func:`drop_pg_database`."""
    import psycopg

    name = f"uploader_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(url: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def upgrade_schema(url: str) -> None:
    """The manifest at ``url`` migrated to its schema's head (as an operator would)."""
    from uploader.manifest import db

    engine = db.create_manifest_engine(url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()


def manifest_url(tmp: Path, name: str) -> str:
    """A new, empty manifest at its schema's head, of the kind ``MANIFEST`` names."""
    if MANIFEST == "sqlite":
        return f"sqlite:///{tmp / f'manifest-{name}.db'}"
    url = new_pg_database()
    _PG_DATABASES.append(url)
    upgrade_schema(url)
    return url


def drop_pg_databases() -> None:
    """Drop the databases :func:`manifest_url` made (at the end of the run)."""
    while _PG_DATABASES:
        drop_pg_database(_PG_DATABASES.pop())


@contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="uploader-bench-") as d:
        yield Path(d)


def save(results: list[Result], path: Path) -> None:
    data = [
        {
            "name": r.name,
            "measurements": r.measurements,
            "ratios": r.ratios,
            "targets": r.targets,
            "notes": r.notes,
            "spreads": r.spreads,
        }
        for r in results
    ]
    path.write_text(json.dumps(data, indent=2) + "\n")
