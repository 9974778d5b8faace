"""``uploader verify --loop``: the scrub finds a verified object deleted remotely, repairs it from
the local file, and counts what it checked and the drift in its metrics."""

from __future__ import annotations

import random
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

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


def test_verify_output_names_each_kind_of_check(capsys: pytest.CaptureFixture[str]) -> None:
    """What `uploader verify` prints for each outcome (the object kept changing while read
    back: NOT JUDGED, which is no drift)."""
    from uploader.cli.daemons import _print_verify
    from uploader.verify import NOT_JUDGED, NOT_VERIFIED, Check, VerifyReport

    report = VerifyReport(
        (
            Check("a", True),
            Check("b", False, "no object at 'b'", "uploaded again", "verified"),
            Check("c", False, f"{NOT_VERIFIED} (open): nothing to compare with yet"),
            Check("d", False, f"{NOT_JUDGED}: object 'd' changed while it was read back", "none"),
        )
    )
    _print_verify(report, json_output=False)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines[:3]] == ["ok", "DRIFT", "NOT"]
    assert lines[2].startswith("NOT VERIFIED c") and lines[3].startswith("NOT JUDGED d")
    assert lines[4] == "checked 4, 1 problem(s)"  # only b drifted


def test_metrics_count_only_judged_checks() -> None:
    """`uploader_checked`/`uploader_drift` count objects judged again: a drifted one is drift; a
    segment not verified yet or an object not judged (changing, the remote failing) is neither."""
    from uploader.cli.daemons import _count_check
    from uploader.verify import NOT_JUDGED, NOT_VERIFIED, Check

    class Counts:
        def __init__(self) -> None:
            self.judged: list[bool] = []
            self.lost = 0

        def verified_again(self, ok: bool) -> None:
            self.judged.append(ok)

        def failed(self, why: str) -> None:
            self.lost += why == "lost"

    counts = Counts()
    for check in (
        Check("a", True),
        Check("b", False, "no object at 'b'", "failed: local file gone too", "failed"),
        Check("c", False, f"{NOT_VERIFIED} (open)"),
        Check("d", False, f"{NOT_JUDGED}: remote error: timeout", "the next pass"),
    ):
        _count_check(counts, check)  # type: ignore[arg-type]
    assert counts.judged == [True, False] and counts.lost == 1
