"""``uploader watch``: files appear and roll, SIGTERM stops it cleanly, a restart carries on."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.cli.conftest import Run, metrics_port, uploader_cmd, uploader_env

PART = 5 * 1024 * 1024


def _wait_for(predicate: object, timeout: float = 60.0) -> None:
    """Poll a condition no line announces (test_scrub, test_watch_rocketmq_kill use it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _wait_line(proc: subprocess.Popen[str], text: str) -> None:
    """Wait for the watcher to say ``text`` on stdout (e.g. that it sealed and verified a key)."""
    assert proc.stdout is not None
    seen = []
    while line := proc.stdout.readline():
        if text in line:
            return
        seen.append(line)
    raise AssertionError(f"the watcher ended without saying {text!r}: {''.join(seen)}")


def _start(home: Path, d: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        uploader_cmd("--part-size", str(PART), "watch", str(d), "--interval", "0.2", *extra),
        env=uploader_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_watch_rolls_segments_and_survives_restart(run: Run, home: Path, tmp_path: Path) -> None:
    rng = random.Random(3)
    d = tmp_path / "commitlog"
    d.mkdir()
    first, second, third = (d / f"{i * 1000:020d}" for i in range(3))
    data = {p: b"" for p in (first, second, third)}

    def append(p: Path, n: int) -> None:
        chunk = rng.randbytes(n)
        data[p] += chunk
        with p.open("ab") as f:
            f.write(chunk)

    append(first, PART + 100)
    proc = _start(home, d, "--metrics-port", "0")
    try:
        remote = home / "remote" / "commitlog"
        # A new file appears: the first one is complete and gets sealed.
        append(first, 50)
        append(second, 10)
        _wait_line(proc, f"sealed and verified commitlog/{first.name}")
        code, _out, err = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "stopped" in err
    assert (remote / first.name).read_bytes() == data[first]
    assert not (remote / second.name).exists()  # the newest is only committed, never sealed

    # Restart: the second grows past a part, a third appears, the watcher carries on.
    append(second, PART)
    append(third, 7)
    proc = _start(home, d)
    try:
        _wait_line(proc, f"sealed and verified commitlog/{second.name}")
        code, _, err = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert (remote / second.name).read_bytes() == data[second]
    status = json.loads(run("status", "--json").stdout)
    assert status["segments"]["verified"] == 2
    assert status["segments"]["open"] == 1  # the third, still being written


def test_metrics_endpoint_serves_the_series(home: Path, tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    (d / "00000000000000000000").write_bytes(b"a" * 1000)
    (d / "00000000000000001000").write_bytes(b"b" * 10)
    proc = _start(home, d, "--metrics-port", "0")
    try:
        port = metrics_port(proc)
        _wait_line(proc, "sealed and verified logs/00000000000000000000")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        for series in (
            "uploader_bytes_uploaded_total",
            "uploader_failures_total",
            "uploader_retries_total",
            'uploader_segments{state="verified"} 1.0',
            'uploader_commits{state="verified"}',
            "uploader_unverified_bytes",
            "uploader_oldest_unverified_seconds",
            "uploader_unfinished_uploads",
            "uploader_stalled_segments 0.0",
            "uploader_checked_total",
            "uploader_drift_total",
        ):
            assert series in text, series
        uploaded = [
            line for line in text.splitlines() if line.startswith("uploader_bytes_uploaded_total")
        ]
        assert float(uploaded[0].split()[1]) >= 1000
    finally:
        code, _, err = _stop(proc)
    assert code == 0, err
