"""Shared pieces: a moto S3 server over HTTP, clients, timing, result tables."""

from __future__ import annotations

import json
import os
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

    def show(self) -> None:
        print(f"\n== {self.name}")
        for k, v in self.measurements.items():
            print(f"  {k:<48} {v:12.3f}")
        for k, v in self.ratios.items():
            target = self.targets.get(k, "")
            print(f"  ratio {k:<42} {v:12.2f}  {target}")
        for n in self.notes:
            print(f"  note: {n}")


#: The moto server process of the current run (its CPU time is reported next to each client's).
SERVER_PID: int | None = None


def server_cpu() -> float:
    """CPU seconds (user + system) the moto server has used so far; 0 if unknown."""
    if SERVER_PID is None:
        return 0.0
    try:
        with open(f"/proc/{SERVER_PID}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of ``fn`` and the moto server's CPU seconds meanwhile."""
    c0 = server_cpu()
    wall = timed(fn)
    return wall, server_cpu() - c0


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
    global SERVER_PID
    SERVER_PID = proc.pid
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("moto server did not start")
        yield url
    finally:
        SERVER_PID = None
        proc.terminate()
        proc.wait(timeout=10)


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "bench",
        "secret": "bench",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }


def boto3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )


def new_bucket(endpoint: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:10]}"
    boto3_client(endpoint).create_bucket(Bucket=name)
    return name


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
        }
        for r in results
    ]
    path.write_text(json.dumps(data, indent=2) + "\n")
