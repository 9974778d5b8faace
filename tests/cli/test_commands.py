"""The CLI end to end, in subprocesses: ship, status, recover, verify, sweep, demo, db."""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import uploader
from tests.cli.conftest import Run, uploader_env, wait_until_no_lease
from uploader.storage import Fault, FaultyStorage, open_storage

PART = 5 * 1024 * 1024  # the CLI uses S3's real minimum part size


def _segments(tmp_path: Path, sizes: list[int]) -> list[Path]:
    rng = random.Random(1)
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"{i:020d}"
        p.write_bytes(rng.randbytes(size))
        paths.append(p)
    return paths


def test_ship_then_status_then_verify(run: Run, home: Path, tmp_path: Path) -> None:
    paths = _segments(tmp_path, [0, 100, PART + 1])
    shipped = run("--part-size", str(PART), "ship", "--key-prefix", "log/", *map(str, paths))
    assert shipped.returncode == 0, shipped.stderr
    assert shipped.stdout.count("verified log/") == 3
    for p in paths:
        assert (home / "remote" / "log" / p.name).read_bytes() == p.read_bytes()

    status = run("status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["segments"]["verified"] == 3
    assert data["all_verified"] is True
    assert data["unverified_bytes"] == 0

    table = run("status")
    assert table.returncode == 0 and "verified" in table.stdout

    ok = run("verify", "--json", "--deep")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["checked"] == 3

    # Damage one object behind the uploader's back: verify says so, exits 1, and uploads it
    # again from the intact local file (removing exactly the damaged object first).
    victim = home / "remote" / "log" / paths[1].name
    victim.write_bytes(b"x" * 100)
    bad = run("verify", "--deep", "log/" + paths[1].name)
    assert bad.returncode == 1
    assert "DRIFT log/" in bad.stdout and "uploaded again" in bad.stdout, bad.stdout
    assert victim.read_bytes() == paths[1].read_bytes()
    again = run("verify", "--deep")
    assert again.returncode == 0, again.stdout + again.stderr


def test_recover_exit_codes(run: Run, home: Path, tmp_path: Path) -> None:
    nothing = run("recover", "--json")
    assert nothing.returncode == 0, nothing.stderr
    assert json.loads(nothing.stdout)["resumed"] == 0

    [path] = _segments(tmp_path, [PART + 10])
    assert run("--part-size", str(PART), "ship", str(path)).returncode == 0
    assert run("recover").returncode == 0

    # A writer commits a segment, its sends fail, it dies; then the local file is deleted.
    lost = tmp_path / "lost"
    lost.write_bytes(b"y" * (PART + 1))
    remote = f"file://{home}/remote"
    faulty = FaultyStorage(open_storage(remote, {}))
    faulty.add(Fault(op="upload_part", when="before"))
    store = uploader.open(
        f"sqlite:///{home}/manifest.db", remote, storage=faulty, part_size=PART, lease_seconds=0.2
    )
    seg = store.segment("lost/1", lost)
    assert seg.commit().exception(timeout=60) is not None
    store.abandon()
    lost.unlink()
    wait_until_no_lease(f"sqlite:///{home}/manifest.db")  # the dead writer's lease runs out

    failed = run("recover", "--json")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    report = json.loads(failed.stdout)
    [entry] = report["failed"]
    assert entry["key"] == "lost/1"
    assert "missing" in entry["reason"]
    status = run("status", "--json")
    assert status.returncode == 1
    assert json.loads(status.stdout)["failed"][0]["key"] == "lost/1"


def test_sweep_dry_run_then_real(run: Run, home: Path) -> None:
    (home / "remote").mkdir(exist_ok=True)
    storage = open_storage(f"file://{home}/remote", {})
    storage.start_upload("orphan/1")
    storage.close()
    dry = run("sweep", "--dry-run", "--older-than", "0", "--json")
    assert dry.returncode == 0, dry.stderr
    data = json.loads(dry.stdout)
    assert [u["key"] for u in data["would_abort"]] == ["orphan/1"]
    real = run("sweep", "--older-than", "0", "--json")
    assert real.returncode == 0, real.stderr
    assert [u["key"] for u in json.loads(real.stdout)["aborted"]] == ["orphan/1"]
    again = run("sweep", "--older-than", "0", "--json")
    assert json.loads(again.stdout)["aborted"] == []


def test_db_upgrade_and_current(run: Run, home: Path) -> None:
    url = f"sqlite:///{home}/other.db"
    up = run("--manifest", url, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    cur = run("--manifest", url, "db", "current")
    assert cur.returncode == 0 and "at head" in cur.stdout


def _check_demo(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "all segments verified" in out
    assert "identical" in out and "DIFFERENT" not in out
    # Readable at 80 columns: no cell cut short, no line longer, no Python value in prose.
    assert "…" not in out, out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert not re.search(r"\b(True|False|None)\b", out), out
    assert "p pending: recorded, not acknowledged" in out  # the part markers explained
    assert re.search(r"\b00000000000008388608 \│ sealed +\│ uupp", out), out


def test_demo_at_80_columns_and_twice_in_one_directory(
    run: Run, home: Path, tmp_path: Path
) -> None:
    env = uploader_env(home, COLUMNS="80")
    _check_demo(run("demo", env=env, timeout=120))

    d = tmp_path / "demo"
    first = run("demo", "--dir", str(d), env=env, timeout=120)
    _check_demo(first)
    again = run("demo", "--dir", str(d), env=env, timeout=120)
    _check_demo(again)
    assert "previous demo run removed from" in again.stdout

    # A directory the demo did not make is never emptied.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious").write_text("keep me")
    refused = run("demo", "--dir", str(other), env=env)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert [p.name for p in other.iterdir()] == ["precious"]


def test_recover_loop_stops_cleanly_on_sigterm(home: Path, tmp_path: Path) -> None:
    import signal
    import subprocess

    from tests.cli.conftest import uploader_cmd, uploader_env

    proc = subprocess.Popen(
        uploader_cmd("recover", "--loop", "--interval", "0.2", "--worker", "looper"),
        env=uploader_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The readiness line comes once the loop's own signal handlers are installed.
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("recovering every 0.2 s as worker looper"), line
        assert proc.poll() is None, "the loop must keep running"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err


def test_signal_handlers_come_before_the_slow_imports() -> None:
    """``python -m uploader.cli`` and the ``uploader`` script import the package first: it must
    load nothing slow, so the CLI's first lines (its early SIGTERM/SIGINT handlers) run at once."""
    import subprocess
    import sys

    probe = (
        "import sys, signal\n"
        "import uploader\n"
        "slow = [m for m in ('sqlalchemy', 'fsspec', 's3fs', 'typer', 'rich', 'alembic') "
        "if m in sys.modules]\n"
        "sys.argv[0] = 'uploader'\n"
        "import uploader.cli as cli\n"
        "print(slow, signal.getsignal(signal.SIGTERM) is cli._early_handler)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert res.stdout.strip() == "[] True", res.stdout + res.stderr


def test_recover_takes_its_bounds_from_the_command_line(
    run: Run, home: Path, tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    """`recover --stuck-passes 1`: a segment stuck on a call the remote does not support fails
    in the first pass, naming it (the default waits for three)."""
    from tests.conftest import s3_options
    from tests.limited_s3 import limited_s3

    data = random.Random(3).randbytes(2 * PART + 3)
    path = tmp_path / "seg"
    path.write_bytes(data)
    with limited_s3(moto_endpoint, refuse={"CompleteMultipartUpload": 405}) as proxy:
        options = s3_options(proxy.url)
        remote = f"s3://{s3_bucket}/root"
        with uploader.open(
            f"sqlite:///{home}/manifest.db",
            remote,
            storage_options=options,
            part_size=PART,
            min_part_size=PART,
        ) as store:
            assert store.segment("s/seg", path).seal().exception(timeout=60) is not None
        args = ("--remote", remote, "--storage-options", json.dumps(options), "recover", "--json")
        res = run(*args, "--stuck-passes", "1", "--max-reuploads", "2")
        assert res.returncode == 1, res.stdout + res.stderr
        [entry] = json.loads(res.stdout)["failed"]
        assert entry["key"] == "s/seg"
        assert (
            "for 1 recovery pass:" in entry["reason"]
            and "CompleteMultipartUpload" in entry["reason"]
        )
