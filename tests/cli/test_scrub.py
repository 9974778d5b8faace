"""``uploader verify --loop``: the scrub finds a verified object deleted remotely, repairs it from
the local file, and counts what it checked and the drift in its metrics."""

from __future__ import annotations

import random
import signal
import subprocess
import urllib.request
from pathlib import Path

from tests.cli.conftest import Run, metrics_port, uploader_cmd, uploader_env
from tests.cli.test_watch import _wait_for

PART = 5 * 1024 * 1024


def _series(text: str, name: str) -> float:
    [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def test_scrub_loop_repairs_drift_and_counts_it(run: Run, home: Path, tmp_path: Path) -> None:
    files = []
    for i in range(6):
        p = tmp_path / f"{i:020d}"
        p.write_bytes(random.Random(i).randbytes(1000 + i))
        files.append(p)
    shipped = run("ship", "--key-prefix", "log/", *map(str, files))
    assert shipped.returncode == 0, shipped.stderr
    victim = home / "remote" / "log" / files[3].name
    victim.unlink()  # a lifecycle rule, a mistaken delete
    proc = subprocess.Popen(
        uploader_cmd(
            "verify", "--loop", "--interval", "0.2", "--batch", "4", "--metrics-port", "0"
        ),
        env=uploader_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = metrics_port(proc)

        def scrubbed() -> bool:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            body = text.decode()
            return (
                _series(body, "uploader_checked_total") >= 6
                and _series(body, "uploader_drift_total") >= 1
            )

        _wait_for(scrubbed)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # drift was found
    assert f"DRIFT log/{files[3].name}" in out and "uploaded again" in out, out
    assert victim.read_bytes() == files[3].read_bytes()
    assert run("verify").returncode == 0
