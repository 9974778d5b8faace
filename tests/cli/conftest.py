"""Run the real ``uploader`` console script in subprocesses, on a private data directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]


def uploader_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOADER_")}
    env["UPLOADER_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def uploader_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "uploader.cli", *args]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def run(home: Path) -> Run:
    """``run(*args, env=..., timeout=...)``: the CLI's exit code, stdout and stderr."""

    def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120, **kw: Any) -> Any:
        return subprocess.run(
            uploader_cmd(*args),
            env=env or uploader_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    return _run


def metrics_port(proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """The port a command started with ``--metrics-port 0`` announced on its stderr."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline() if proc.stderr else ""
        if "metrics on http://127.0.0.1:" in line:
            return int(line.rsplit(":", 1)[1].split("/")[0])
        if not line and proc.poll() is not None:
            break
    raise AssertionError("the command never announced its metrics port")


def wait_until_no_lease(manifest_url: str, timeout: float = 30.0) -> None:
    """Wait for the event "every lease on an unfinished segment ran out", as the manifest judges
    it (a dead writer's lease; the CLI in a subprocess runs on the real clock)."""
    import threading
    import time

    from uploader.manifest.repo import Manifest

    m = Manifest.open(manifest_url)
    try:
        deadline = time.monotonic() + timeout
        while leased := m.leased_unfinished():
            until = max(e for _, _, e in leased)
            assert time.monotonic() < deadline, f"leases still held: {leased}"
            # Ask again just after the latest expiry the manifest reported (bounded).
            left = (until - m.clock()).total_seconds()
            threading.Event().wait(min(max(left, 0.01), 1.0))
    finally:
        m.close()
