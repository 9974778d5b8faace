"""`uploader get`, `restore` (resumable, also after SIGKILL) and `rebuild`, in subprocesses."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
from pathlib import Path

from tests.cli.conftest import Run, uploader_cmd, uploader_env


def _ship(run: Run, tmp_path: Path, n: int, size: int = 50_000) -> dict[str, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(n)
    blobs = {}
    for i in range(n):
        p = src / f"{i:020d}"
        p.write_bytes(rng.randbytes(size + i))
        blobs[f"log/{p.name}"] = p.read_bytes()
    shipped = run("ship", "--key-prefix", "log/", *sorted(str(p) for p in src.iterdir()))
    assert shipped.returncode == 0, shipped.stderr
    return blobs


def _rows(db: Path) -> dict[str, tuple[object, ...]]:
    """Each segment's size, whole-file CRC32C, expected ETag and its parts' ranges and checksums."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        segs = conn.execute("SELECT id, key, size, crc32c, expected_etag FROM segments").fetchall()
        out: dict[str, tuple[object, ...]] = {}
        for seg_id, key, size, crc, etag in segs:
            parts = conn.execute(
                "SELECT part_number, start_offset, end_offset, md5, crc32c FROM commits "
                "WHERE segment_id = ? ORDER BY part_number",
                (seg_id,),
            ).fetchall()
            out[key] = (size, crc, etag, tuple(parts))
    return out


def test_get_to_a_file_and_to_stdout(run: Run, tmp_path: Path) -> None:
    blobs = _ship(run, tmp_path, 2)
    key, data = sorted(blobs.items())[0]
    dest = tmp_path / "got"
    got = run("get", key, str(dest), "--json")
    assert got.returncode == 0, got.stderr
    assert dest.read_bytes() == data
    assert json.loads(got.stdout)["unchecked_bytes"] == 0
    piped = subprocess.run(
        uploader_cmd("get", key, "-"), env=uploader_env(tmp_path / "home"), capture_output=True
    )
    assert piped.returncode == 0 and piped.stdout == data
    missing = run("get", "log/none", str(dest))
    assert missing.returncode == 2 and "not in the manifest" in missing.stderr


def test_restore_is_resumable_after_sigkill(run: Run, home: Path, tmp_path: Path) -> None:
    blobs = _ship(run, tmp_path, 100, size=5_000)
    out_dir = tmp_path / "restored"
    proc = subprocess.Popen(
        uploader_cmd("--concurrency", "1", "restore", str(out_dir)),
        env=uploader_env(home),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # wait for the first restored file, then kill
    assert line.startswith("restored "), line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()

    again = run("restore", str(out_dir), "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["failed"] == 0 and report["restored"] + report["skipped"] == len(blobs)
    assert report["skipped"] >= 1  # what the killed run finished is not redone
    for key, data in blobs.items():
        assert (out_dir / key).read_bytes() == data
    assert not [p for p in out_dir.rglob(".*.uploader-part")]  # every temporary file replaced

    (out_dir / sorted(blobs)[0]).unlink()
    with open(out_dir / sorted(blobs)[1], "r+b") as f:
        f.write(b"\0")  # same size, other bytes: the CRC32C tells
    third = run("restore", str(out_dir), "--json")
    report = json.loads(third.stdout)
    assert (report["restored"], report["skipped"]) == (2, len(blobs) - 2), report
    for key, data in blobs.items():
        assert (out_dir / key).read_bytes() == data


def test_rebuild_after_the_manifest_is_lost(run: Run, home: Path, tmp_path: Path) -> None:
    blobs = _ship(run, tmp_path, 100, size=5_000)
    before = json.loads(run("status", "--json").stdout)
    rows_before = _rows(home / "manifest.db")
    (home / "manifest.db").unlink()
    for extra in ("manifest.db-wal", "manifest.db-shm"):
        (home / extra).unlink(missing_ok=True)
    foreign = home / "remote" / "log" / "foreign"
    foreign.write_bytes(b"not ours")

    rebuilt = run("rebuild", "--prefix", "log/", "--json")
    assert rebuilt.returncode == 1, rebuilt.stderr  # an object of unknown origin
    report = json.loads(rebuilt.stdout)
    assert (report["created"], report["unknown"]) == (len(blobs), 1)
    after = json.loads(run("status", "--json").stdout)
    assert after["segments"]["verified"] == before["segments"]["verified"] == len(blobs)
    assert after["commits"]["verified"] == before["commits"]["verified"]
    rows_after = _rows(home / "manifest.db")
    assert {k: v for k, v in rows_after.items() if k in blobs} == rows_before
    assert after["segments"]["unknown"] == 1
    assert run("status").returncode == 1

    again = run("rebuild", "--json")
    assert json.loads(again.stdout)["matched"] == len(blobs) + 1
    out_dir = tmp_path / "r"
    restored = run("restore", str(out_dir), "--prefix", "log/")
    assert restored.returncode == 0, restored.stderr
    for key, data in blobs.items():
        assert (out_dir / key).read_bytes() == data
    assert not (out_dir / "log" / "foreign").exists()
