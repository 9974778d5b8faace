"""``uploader demo``: the RocketMQ failure, replayed and survived, offline, in a few seconds.

1. A broker writes a real RocketMQ-format commit log: each file created at its full size (zeros)
   and filled in place; the sidecar reads the record chain and commits only through the last
   complete record (``commit(upto=...)``), never the zeros after it.
2. Two files roll (their BLANK end is written): each is sealed at its full size, every local byte
   is read again, the object completed and verified.
3. The third file rolls; its final commit fails (injected fault) and the caller ignores the
   future, exactly like RocketMQ's ``commitAsync``. The manifest still shows the unfinished part.
4. The process "restarts"; the recovery job finds the unfinished seal, re-sends only what is
   missing, completes and verifies it.
5. Every remote object is compared byte for byte with its local file, and every record of every
   remote copy has its body CRC checked.
"""

from __future__ import annotations

import gc
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
from rich.console import Console
from rich.table import Table

from uploader.errors import RetryableStorageError
from uploader.formats.rocketmq import (
    END_FILE_MIN_BLANK_LENGTH,
    RocketMQFormat,
    blank_head,
    check_message,
    encode_message,
)
from uploader.manifest import db
from uploader.storage import Fault, FaultyStorage, open_storage
from uploader.store import Store
from uploader.store import open as open_store

MiB = 1024 * 1024
PART = 1 * MiB
SEGMENTS = 3
FILE_SIZE = 4 * PART  # one commit-log file (1 GiB in a real broker), preallocated


class _Broker:
    """Writes messages into preallocated commit-log files in place, as ``CommitLog`` does."""

    def __init__(self, directory: Path, rng: random.Random) -> None:
        self.directory = directory
        self.rng = rng
        self.start = 0
        self.pos = 0
        self.records: dict[str, list[tuple[int, int]]] = {}
        self._create(0)

    @property
    def name(self) -> str:
        return f"{self.start:020d}"

    def _create(self, start: int) -> None:
        path = self.directory / f"{start:020d}"
        with path.open("wb") as f:
            f.truncate(FILE_SIZE)  # zeros until written: the file size says nothing
        self.records[path.name] = []

    def write(self, count: int) -> None:
        with (self.directory / self.name).open("r+b") as f:
            for _ in range(count):
                record = encode_message(
                    self.rng.randbytes(self.rng.randrange(500, 4000)),
                    queue_offset=sum(len(r) for r in self.records.values()),
                    physical_offset=self.start + self.pos,
                )
                if self.pos + len(record) + END_FILE_MIN_BLANK_LENGTH > FILE_SIZE:
                    return self._roll(f)
                f.seek(self.pos)
                f.write(record)
                self.records[self.name].append((self.pos, len(record)))
                self.pos += len(record)
        return None

    def _roll(self, f: Any) -> None:
        """The next message does not fit: a BLANK end, then the next file."""
        f.seek(self.pos)
        f.write(blank_head(FILE_SIZE - self.pos))
        f.flush()
        self.start += FILE_SIZE
        self.pos = 0
        self._create(self.start)

    def fill(self) -> str:
        """Write until the current file rolls; return its name."""
        name = self.name
        while self.name == name:
            self.write(50)
        return name


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
    broker = _Broker(logs, rng)
    fmt = RocketMQFormat()
    console.print(
        "[bold]1. the broker writes a preallocated commit log in place; the sidecar commits "
        "only complete records[/bold]"
    )
    names: list[str] = []
    for _ in range(SEGMENTS):
        name = broker.name
        path = logs / name
        seg = store.segment(f"commitlog/{name}", path)
        for _ in range(3):
            broker.write(300)
            if broker.name != name:
                break
            valid = fmt.scan(str(path), 0, rolled=False).valid_end
            res = seg.commit(upto=valid).result()
            console.print(
                f"  commit {seg.key} up to {valid} of {FILE_SIZE} bytes: {res.sent_parts} "
                f"part(s) sent, {res.carried_bytes} bytes carried to the next commit"
            )
        if broker.name == name:
            broker.fill()
        names.append(name)
    keys = [f"commitlog/{n}" for n in names]

    console.print(
        "\n[bold]2. two files rolled (BLANK end written): sealed at full size, every local byte "
        "read again, completed, verified[/bold]"
    )
    for key, name in zip(keys[:-1], names[:-1], strict=True):
        scan = fmt.scan(str(logs / name), 0, rolled=True)
        assert scan.complete, scan
        res = store.segment(key, logs / name).seal(size=scan.valid_end).result()
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
    last_size = fmt.scan(str(logs / names[-1]), 0, rolled=True).valid_end
    # Fire and forget, as commitAsync did:
    store.segment(keys[-1], logs / names[-1]).seal(size=last_size)
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

    console.print(
        "\n[bold]5. byte-for-byte check of every object against its local file, and every "
        "record's body CRC on the remote copy[/bold]"
    )
    fs = fsspec.filesystem("file")
    ok = lost_before and report.ok
    for key, name in zip(keys, names, strict=True):
        local = (logs / name).read_bytes()
        path = remote_dir / key
        copy = fs.cat_file(str(path)) if fs.exists(str(path)) else b""
        same = copy == local
        records = broker.records[name]
        crcs = same and all(check_message(copy[o : o + n]).ok for o, n in records)
        ok = ok and same and crcs
        console.print(
            f"  {key}: {len(local)} bytes, {'identical' if same else 'DIFFERENT'}, "
            f"{len(records)} records, CRCs {'ok' if crcs else 'BAD'}"
        )
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
