"""``uploader demo``: the RocketMQ failure, replayed and survived, offline, in a few seconds.

1. A broker writes three segment files; the sidecar commits them as they grow.
2. Two segments are sealed: completed and verified.
3. The third becomes full; its final commit fails (injected fault) and the caller ignores the
   future, exactly like RocketMQ's ``commitAsync``. The manifest still shows the unfinished part.
4. The process "restarts"; the recovery job finds the unfinished seal, re-sends only what is
   missing, completes and verifies it.
5. Every remote object is compared byte for byte with its local file.
"""

from __future__ import annotations

import gc
import random
import tempfile
import time
from pathlib import Path

import fsspec
from rich.console import Console
from rich.table import Table

from uploader.errors import RetryableStorageError
from uploader.manifest import db
from uploader.storage import Fault, FaultyStorage, open_storage
from uploader.store import Store
from uploader.store import open as open_store

MiB = 1024 * 1024
PART = 1 * MiB
SEGMENTS = 3
SEGMENT_SIZE = 3 * PART + 300 * 1024  # three whole parts and a tail: the tail is what RocketMQ lost


def _table(store: Store, title: str) -> Table:
    table = Table(title=title)
    table.add_column("segment", no_wrap=True)
    for col in ("state", "parts", "pending parts", "bytes", "last error"):
        table.add_column(col)
    for seg in store.manifest.segments():
        commits = store.manifest.commits(seg.id)
        pending = [c for c in commits if c.state.value == "pending"]
        table.add_row(
            seg.key,
            seg.state.value,
            " ".join(c.state.value[0] for c in commits),
            ", ".join(f"#{c.part_number} [{c.start}, {c.end})" for c in pending) or "-",
            str(seg.size if seg.size is not None else (commits[-1].end if commits else 0)),
            (seg.last_error or "")[:40],
        )
    return table


def run_demo(console: Console, directory: Path | None = None) -> bool:
    """Run the story; True when every segment ended verified and byte-identical."""
    started = time.monotonic()
    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="uploader-demo-")
        directory = Path(tmp.name)
    try:
        return _story(console, directory, started)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _story(console: Console, base: Path, started: float) -> bool:
    base.mkdir(parents=True, exist_ok=True)
    logs, remote_dir = base / "commitlog", base / "remote"
    logs.mkdir(exist_ok=True)
    remote_dir.mkdir(exist_ok=True)
    manifest = f"sqlite:///{base / 'manifest.db'}"
    remote = f"file://{remote_dir}"
    engine = db.create_manifest_engine(manifest)
    db.upgrade(engine)
    engine.dispose()
    console.rule("segment-uploader demo")
    console.print(f"manifest {manifest}\nremote   {remote}\nsegments {logs}\n")

    rng = random.Random(2024)
    faulty = FaultyStorage(open_storage(remote, {}, min_part_size=PART))
    store = open_store(manifest, remote, storage=faulty, part_size=PART, concurrency=4)
    names = [f"{i * SEGMENT_SIZE:020d}" for i in range(SEGMENTS)]
    keys = [f"commitlog/{n}" for n in names]
    console.print(
        "[bold]1. the broker appends; every commit records its parts before sending[/bold]"
    )
    for name, key in zip(names, keys, strict=True):
        path = logs / name
        path.write_bytes(b"")
        seg = store.segment(key, path)
        for _ in range(4):
            with path.open("ab") as f:
                f.write(rng.randbytes(SEGMENT_SIZE // 4))
            res = seg.commit().result()
            console.print(
                f"  commit {key}: {res.sent_parts} part(s) sent, {res.carried_bytes} bytes "
                "carried to the next commit"
            )
        with path.open("ab") as f:
            f.write(rng.randbytes(SEGMENT_SIZE - path.stat().st_size))

    console.print("\n[bold]2. two full segments are sealed: completed, then verified[/bold]")
    for key, name in zip(keys[:-1], names[:-1], strict=True):
        res = store.segment(key, logs / name).seal().result()
        console.print(f"  sealed {key}: verified={res.verified}, etag {res.object_etag}")

    console.print(
        "\n[bold]3. the RocketMQ failure: the final commit of the last full segment fails and "
        "the caller ignores the future[/bold]"
    )
    faulty.add(
        Fault(
            op="upload_part",
            when="before",
            error=lambda: RetryableStorageError(
                "injected: connection reset during the final upload"
            ),
        )
    )
    store.segment(keys[-1], logs / names[-1]).seal()  # fire and forget, as commitAsync did
    store.close()  # the broker moves on (or crashes); the future was never looked at
    gc.collect()
    check = open_store(manifest, remote, part_size=PART, min_part_size=PART)
    console.print(_table(check, "manifest after the ignored failure"))
    last = check.manifest.segment(keys[-1])
    assert last is not None
    visible = check.storage.head(keys[-1])
    console.print(
        f"  {keys[-1]} is {last.state.value}; its tail is recorded as pending, nothing is "
        f"visible at the key: {visible is None}"
    )
    lost_before = last.state.value != "verified"

    console.print(
        "\n[bold]4. the recovery job finishes it (re-sending only what is missing)[/bold]"
    )
    report = check.recover()
    for o in report.outcomes:
        console.print(f"  {o.key}: {o.before} -> {o.after}: {o.detail}")
    console.print(
        f"  {report.bytes_sent} bytes sent, {report.bytes_reused} bytes reused from the remote"
    )
    console.print(_table(check, "manifest after recovery"))

    console.print("\n[bold]5. byte-for-byte check of every object against its local file[/bold]")
    fs = fsspec.filesystem("file")
    ok = lost_before and report.ok
    for key, name in zip(keys, names, strict=True):
        local = (logs / name).read_bytes()
        path = remote_dir / key
        same = fs.exists(str(path)) and fs.cat_file(str(path)) == local
        ok = ok and same
        console.print(f"  {key}: {len(local)} bytes, {'identical' if same else 'DIFFERENT'}")
    status = check.status()
    ok = ok and status.all_verified
    deletable = [s.key for s in check.deletable()]
    check.close()
    console.print(f"  deletable locally now: {', '.join(deletable)}")
    console.rule(
        f"{'all segments verified' if ok else 'SOMETHING IS NOT VERIFIED'} "
        f"in {time.monotonic() - started:.1f} s"
    )
    return ok
