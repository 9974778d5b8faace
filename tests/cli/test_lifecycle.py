"""The operator's lifecycle, end to end in subprocesses (issue 12): ship re-run over a mix,
retry after a fix, Ctrl-C once and twice during a long ship, a typo'd manifest creates nothing,
printed commands run as printed, input checks. Tests wait for the CLI's lines, never sleep."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import uploader
from tests.cli.conftest import Run, uploader_env
from uploader.manifest.repo import Manifest
from uploader.storage import Fault, FaultyStorage, open_storage

PART = 1024 * 1024
SMALL_PARTS = ("--part-size", str(PART), "--min-part-size", str(PART))


def _file(path: Path, size: int, seed: int = 1) -> Path:
    import random

    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _sealed_unfinished(home: Path, key: str, path: Path) -> None:
    """A seal recorded whose part sends failed: sealed, parts pending (what a crash leaves)."""
    remote = f"file://{home}/remote"
    (home / "remote").mkdir(exist_ok=True)
    faulty = FaultyStorage(open_storage(remote, {}, min_part_size=PART))
    faulty.add(Fault(op="upload_part", when="before"))
    with uploader.open(
        f"sqlite:///{home}/manifest.db", remote, storage=faulty, part_size=PART
    ) as store:
        assert store.segment(key, path).seal().exception(timeout=60) is not None
        assert store.manifest.segment(key).state.value == "sealed"  # type: ignore[union-attr]


def test_ship_reruns_over_a_mix(run: Run, home: Path, tmp_path: Path) -> None:
    done = _file(tmp_path / "done", 100)
    assert run(*SMALL_PARTS, "ship", str(done)).returncode == 0
    sealed = _file(tmp_path / "sealed", 2 * PART + 7, seed=2)
    _sealed_unfinished(home, "sealed", sealed)
    broken = _file(tmp_path / "broken", 10, seed=3)
    m = Manifest.open(f"sqlite:///{home}/manifest.db")
    m.register("broken", str(broken), node="n", part_size=PART, worker="w")
    m.fail_segment(m.acquire("broken", "w"), "local bytes unusable: test")
    m.close()
    new = _file(tmp_path / "new", PART + 1, seed=4)

    first = run(*SMALL_PARTS, "ship", "--json", *map(str, (done, sealed, broken, new)))
    assert first.returncode == 1, first.stderr  # one failed: the others are still done
    data = json.loads(first.stdout)
    by_key = {s["key"]: s for s in data["segments"]}
    assert data["failed"] == 1
    assert by_key["done"]["verified"] and "already verified" in by_key["done"]["note"]
    assert by_key["sealed"]["verified"] and "resumed" in by_key["sealed"]["note"]
    assert by_key["new"]["verified"] and by_key["new"]["note"] == "shipped"
    assert not by_key["broken"]["verified"]
    assert "`uploader retry broken`" in by_key["broken"]["error"]
    for p in (done, sealed, new):
        assert (home / "remote" / p.name).read_bytes() == p.read_bytes()

    # Everything but the failed one again: all verified, exit 0, JSON printed.
    again = run(*SMALL_PARTS, "ship", "--json", *map(str, (done, sealed, new)))
    assert again.returncode == 0, again.stderr
    assert all(s["verified"] for s in json.loads(again.stdout)["segments"])
    text = run(*SMALL_PARTS, "ship", str(done))
    assert text.returncode == 0 and "verified done (100 bytes, already verified" in text.stdout


def test_retry_after_the_cause_is_fixed(run: Run, home: Path, tmp_path: Path) -> None:
    seg = _file(tmp_path / "seg", 2 * PART + 5)
    _sealed_unfinished(home, "seg", seg)
    backup = tmp_path / "backup"
    seg.rename(backup)  # the local file is gone: recovery fails the segment
    failed = run(*SMALL_PARTS, "recover")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    status = run("status")
    assert status.returncode == 1
    assert "failed seg:" in status.stdout and "uploader retry" in status.stdout
    assert run("recover").returncode == 1  # stays failed until a human says otherwise

    shutil.copy(backup, seg)  # restored from a copy: another inode, the same bytes
    retried = run(*SMALL_PARTS, "retry", "seg", "--reason", "file restored from backup")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "retried seg: verified" in retried.stdout
    assert (home / "remote" / "seg").read_bytes() == seg.read_bytes()
    assert run("status").returncode == 0
    assert run("verify", "--deep").returncode == 0

    m = Manifest.open(f"sqlite:///{home}/manifest.db")
    rec = m.segment("seg")
    assert rec is not None
    [event] = [e for e in m.events(rec.id) if e.commit_id is None and e.from_state == "failed"]
    m.close()
    assert event.to_state == "sealed"
    assert "@" in event.worker and "pid" in event.worker  # who
    assert "file restored from backup" in (event.detail or "")  # why (when: event.at)

    again = run("retry", "seg")
    assert again.returncode == 2 and "not failed" in again.stderr  # bad input: nothing changed
    unknown = run("retry", "no/such/key")
    assert unknown.returncode == 2 and "not in the manifest" in unknown.stderr
    assert run("retry").returncode == 2  # neither keys nor --all-failed
    none = run("retry", "--all-failed", "--json")
    assert none.returncode == 0 and json.loads(none.stdout)["retried"] == []


def _slow_ship(home: Path, *args: str) -> subprocess.Popen[str]:
    helper = Path(__file__).with_name("slow_ship.py")
    return subprocess.Popen(
        [sys.executable, str(helper), *args],
        env=uploader_env(home, PYTHONPATH=str(Path(__file__).parents[2])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], pattern: str, count: int = 1) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    seen = 0
    while seen < count:
        line = proc.stderr.readline()
        assert line, f"process ended before {pattern!r}: {''.join(lines)}"
        lines.append(line)
        seen += pattern in line
    return lines


@pytest.mark.timeout(120)
def test_first_sigint_lets_parts_in_flight_finish(run: Run, home: Path, tmp_path: Path) -> None:
    files = [_file(tmp_path / f"{i:04d}", 4 * PART + 3, seed=i) for i in range(3)]
    proc = _slow_ship(home, *SMALL_PARTS, "--concurrency", "2", "ship", *map(str, files))
    _read_until(proc, "in flight part", count=2)  # both slots hold a part at the remote
    proc.send_signal(signal.SIGINT)
    _read_until(proc, "no new work is started")
    proc.send_signal(signal.SIGUSR1)  # the remote answers the parts in flight
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    [line] = [x for x in stderr.splitlines() if x.startswith("interrupted:")]
    assert re.fullmatch(
        r"interrupted: 0 verified, \d+ unfinished; `uploader recover` finishes them.*", line
    ), line

    status = json.loads(run("status", "--json").stdout)
    assert status["segments"]["failed"] == 0
    assert status["commits"]["uploaded"] == 2  # the two parts in flight, recorded
    assert status["commits"]["failed"] == 0

    rec = run(*SMALL_PARTS, "recover")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    again = run(*SMALL_PARTS, "ship", *map(str, files))
    assert again.returncode == 0, again.stdout + again.stderr
    for f in files:
        assert (home / "remote" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.timeout(120)
def test_second_sigint_exits_at_once_and_the_manifest_is_consistent(
    run: Run, home: Path, tmp_path: Path
) -> None:
    files = [_file(tmp_path / f"{i:04d}", 3 * PART + 1, seed=i) for i in range(2)]
    # The default 30 s lease: only the same node's takeover lets recover finish at once.
    proc = _slow_ship(home, *SMALL_PARTS, "--concurrency", "2", "ship", *map(str, files))
    _read_until(proc, "in flight part", count=2)
    proc.send_signal(signal.SIGINT)
    _read_until(proc, "no new work is started")
    proc.send_signal(signal.SIGINT)  # the held parts never answer: only exiting ends it
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted again: exiting now" in stderr

    assert json.loads(run("status", "--json").stdout)["segments"]["failed"] == 0
    # On another node nobody can tell that the process is gone: its leases hold its segments
    # until they run out, and recover says so and exits 1 while work remains.
    elsewhere = uploader_env(home, UPLOADER_NODE="elsewhere")
    leased = run(*SMALL_PARTS, "recover", env=elsewhere)
    assert leased.returncode == 1, leased.stdout + leased.stderr
    assert re.search(r"\d unfinished, leased by [^:]+:\d+ until \d\d:\d\d:\d\d", leased.stderr)
    m = Manifest.open(f"sqlite:///{home}/manifest.db")
    assert m.status().segments["failed"] == 0  # consistent: nothing failed by the exit
    m.close()
    # On its own node the holder process is gone: recover takes its leases over at once.
    rec = run(*SMALL_PARTS, "recover")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    again = run(*SMALL_PARTS, "ship", "--json", *map(str, files))
    assert again.returncode == 0, again.stderr
    assert run("verify", "--deep").returncode == 0


def _printed_command(stderr: str) -> list[str]:
    """The command in backticks of an error line, as a user would paste it."""
    m = re.search(r"`(uploader [^`]+)`", stderr)
    assert m, stderr
    argv = shlex.split(m.group(1))
    assert argv[0] == "uploader"
    return argv[1:]


def test_a_typo_creates_nothing_and_the_hint_runs_as_printed(
    run: Run, home: Path, tmp_path: Path
) -> None:
    nowhere = tmp_path / "nodir"
    url = f"sqlite:///{nowhere}/m.db"
    for args in (("status",), ("recover",), ("db", "current")):
        res = run("--manifest", url, *args)
        assert res.returncode == 2, res.stderr
        assert "no such SQLite file" in res.stderr
        assert not nowhere.exists()
    assert list(home.iterdir()) == []  # not even the embedded remote directory

    hint = _printed_command(run("--manifest", url, "status").stderr)
    assert run(*hint).returncode == 0
    status = run("--manifest", url, "status")
    assert status.returncode == 0, status.stderr
    assert f"manifest {url}; remote file://{home}/remote" in status.stdout


def test_status_in_a_fresh_directory_creates_nothing(run: Run, home: Path) -> None:
    res = run("status", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["manifest"] == f"sqlite:///{home}/manifest.db"
    assert data["all_verified"] is True
    assert list(home.iterdir()) == []
    bad = run("--remote", "bucket/prefix", "status")
    assert bad.returncode == 2 and "no scheme" in bad.stderr


def test_schema_hint_on_postgres_runs_as_printed(run: Run, pg_url: str) -> None:
    from alembic.script import ScriptDirectory

    from uploader.manifest import db

    engine = db.create_manifest_engine(pg_url)
    head = ScriptDirectory(db.migrations_dir()).get_revision(db.head_revision())
    db.upgrade(engine, str(head.down_revision))
    engine.dispose()
    behind = run("--manifest", pg_url, "status")
    assert behind.returncode == 1, behind.stderr
    hint = _printed_command(behind.stderr)
    up = run(*hint)
    assert up.returncode == 0, up.stderr
    assert run("--manifest", pg_url, "status").returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ("recover", "--loop", "--interval", "0"),
        ("recover", "--loop", "--interval", "-1"),
        ("watch", ".", "--interval", "0"),
        ("verify", "--loop", "--interval", "0"),
        ("sweep", "--older-than", "-5"),
    ],
)
def test_bad_intervals_are_refused(run: Run, args: tuple[str, ...]) -> None:
    res = run(*args, timeout=30)
    assert res.returncode == 2, res.stdout + res.stderr


def test_watch_a_file_and_ship_a_directory_say_so(run: Run, tmp_path: Path) -> None:
    f = _file(tmp_path / "0001", 10)
    watch = run("watch", str(f))
    assert watch.returncode == 2 and "is a file" in watch.stderr and "uploader ship" in watch.stderr
    ship = run("ship", str(tmp_path))
    assert ship.returncode == 2
    assert "is a directory" in ship.stderr and "uploader watch" in ship.stderr


def test_ship_json_is_printed_when_a_file_is_refused(run: Run, tmp_path: Path) -> None:
    a = _file(tmp_path / "a", 10)
    b_dir = tmp_path / "other"
    b_dir.mkdir()
    b = _file(b_dir / "a", 20, seed=2)  # the same key for another file
    assert run("ship", str(a)).returncode == 0
    res = run("ship", "--json", str(b), str(a))
    assert res.returncode == 1
    data = json.loads(res.stdout)
    assert [s["verified"] for s in data["segments"]] == [False, True]
    assert "already registered" in data["segments"][0]["error"]
    assert os.path.exists(a)


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("postgress://postgres:pw-x7@127.0.0.1/m", "did you mean postgresql://"),
        ("postgresql+psycopg2://postgres@127.0.0.1/m", "psycopg 3"),
        ("sqlite3:///m.db", "did you mean sqlite:///"),
        ("sqlite:/m.db", "three slashes"),
        ("sqlite://m.db", "no host"),
        ("mysql://u@db/m", "mysql:// is not a manifest database"),
    ],
)
def test_misspelt_manifest_schemes_name_the_accepted_forms(
    run: Run, home: Path, tmp_path: Path, url: str, hint: str
) -> None:
    commands: list[tuple[str, ...]] = [("status",)]
    if url.startswith("postgress"):  # the commands that write, once (each run costs seconds)
        commands += [("db", "upgrade"), ("ship", str(tmp_path / "f"))]
    _file(tmp_path / "f", 10)
    for args in commands:
        res = run("--manifest", url, *args, cwd=tmp_path)
        assert res.returncode == 2, res.stdout + res.stderr
        line = res.stderr.strip().splitlines()[-1]
        assert hint in line and "Traceback" not in res.stderr, line
        assert "accepted forms: sqlite:////absolute/path.db" in line
        assert "postgresql://user[:password]@host[:port]/database" in line
        assert "pw-x7" not in res.stderr
        assert list(home.iterdir()) == []  # nothing created: no remote directory, no database
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "home"]


def test_an_unreachable_s3_endpoint_is_not_silent(run: Run, tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    f = _file(tmp_path / "0001", 100)
    options = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"})
    res = run("--remote", "s3://bucket/p", "--storage-options", options, "ship", str(f))
    assert res.returncode == 1, res.stdout + res.stderr
    notices = [line for line in res.stderr.splitlines() if line.startswith("retrying ")]
    # One line per retry: the operation, the endpoint, the attempt and the wait.
    assert len(notices) == 4, res.stderr
    for n, line in enumerate(notices, start=1):
        assert re.match(
            rf"retrying put on http://127\.0\.0\.1:{port} \(s3://bucket/p\) in \d+\.\d s "
            rf"\(attempt {n} of 5 failed: .*connect",
            line,
        ), line
    assert "not verified 0001" in res.stderr
