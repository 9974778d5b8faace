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
