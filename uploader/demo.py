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
PREFIX = "commitlog/"  # the keys: PREFIX + file name


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


#: What the letters of the table's ``parts`` column mean (one letter per part, in order).
PART_MARKERS = {
    "pending": ("p", "recorded, not acknowledged by the remote yet"),
    "uploaded": ("u", "acknowledged by the remote"),
    "verified": ("v", "in a complete object whose checksums matched"),
    "failed": ("f", "given up on (see the segment's reason)"),
}


def _table(store: Store, title: str, prefix: str, legend: bool) -> list[Table | str]:
    """The manifest as a table that fits 80 columns (no cell is cut), then what does not fit in
    a cell (pending byte ranges, last errors) as lines below it."""
    table = Table(title=f"{title} (keys {prefix}<segment>)")
    table.add_column("segment", no_wrap=True)
    for col in ("state", "parts", "pending", "bytes"):
        table.add_column(col, no_wrap=True, justify="right" if col == "bytes" else "left")
    notes = ["  parts, one letter each:"] if legend else []
    notes += [f"    {m} {state}: {what}" for state, (m, what) in PART_MARKERS.items() if legend]
    for seg in store.manifest.segments():
        commits = store.manifest.commits(seg.id)
        pending = [c for c in commits if c.state.value == "pending"]
        name = seg.key.removeprefix(prefix)
        table.add_row(
            name,
            seg.state.value,
            "".join(PART_MARKERS[c.state.value][0] for c in commits),
            " ".join(f"#{c.part_number}" for c in pending) or "-",
            str(seg.size if seg.size is not None else (commits[-1].end if commits else 0)),
        )
        for c in pending:
            notes.append(f"  {name} part #{c.part_number} pending: bytes [{c.start}, {c.end})")
        if seg.last_error and seg.state.value != "verified":
            notes.append(f"  {name} last error: {seg.last_error}")
    return [table, *notes]


#: Marks a directory as the demo's own (``demo --dir``): a second run may start it afresh.
MARKER = ".uploader-demo"
_CREATED = ("commitlog", "remote", "manifest.db", "manifest.db-wal", "manifest.db-shm", MARKER)


def _prepare(console: Console, base: Path) -> None:
    """An empty or new directory, or one an earlier demo run left (started afresh); anything
    else is refused: the demo never deletes what it did not create."""
    import shutil

    from uploader.errors import UsageError

    if base.exists() and not base.is_dir():
        raise UsageError(f"demo --dir {base}: not a directory")
    if base.exists() and any(base.iterdir()):
        if not (base / MARKER).exists():
            raise UsageError(
                f"demo --dir {base}: the directory is not empty and no earlier demo run made it "
                f"(no {MARKER} file); choose an empty or new directory"
            )
        others = [p.name for p in base.iterdir() if p.name not in _CREATED]
        if others:
            raise UsageError(
                f"demo --dir {base}: holds files the demo did not create ({', '.join(others)}); "
                "choose an empty or new directory"
            )
        for name in _CREATED:
            path = base / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        console.print(f"previous demo run removed from {base}; starting afresh", soft_wrap=False)
    base.mkdir(parents=True, exist_ok=True)
    (base / MARKER).write_text("made by `uploader demo`; a new run replaces what is here\n")


def run_demo(console: Console, directory: Path | None = None) -> bool:
    """Run the story; True when every segment ended verified and byte-identical.

    ``directory``: work there (kept afterwards); a directory an earlier run left is started
    afresh, any other non-empty one refused (UsageError)."""
    started = time.monotonic()
    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="uploader-demo-")
        directory = Path(tmp.name)
    else:
        _prepare(console, directory)
    try:
        return _story(console, directory, started)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _story(console: Console, base: Path, started: float) -> bool:
    def say(text: str = "") -> None:
        # Wrapped at the console's width (80 when it is not a terminal): readable anywhere.
        console.print(text, soft_wrap=False)

    def show(title: str, legend: bool = False) -> None:
        for item in _table(check, title, PREFIX, legend):
            console.print(item, soft_wrap=False)

    logs, remote_dir = base / "commitlog", base / "remote"
    logs.mkdir(exist_ok=True)
    remote_dir.mkdir(exist_ok=True)
    manifest = f"sqlite:///{base / 'manifest.db'}"
    remote = f"file://{remote_dir}"
    engine = db.create_manifest_engine(manifest)
    db.upgrade(engine)
    engine.dispose()
    console.rule("segment-uploader demo")
    say(f"manifest {manifest}")
    say(f"remote   {remote}")
    say(f"segments {logs} (keys {PREFIX}<file name>)")
    say()

    rng = random.Random(2024)
    faulty = FaultyStorage(open_storage(remote, {}, min_part_size=PART))
    store = open_store(manifest, remote, storage=faulty, part_size=PART, concurrency=4)
    broker = _Broker(logs, rng)
    fmt = RocketMQFormat()
    say(
        "[bold]1. the broker writes a preallocated commit log in place; the sidecar commits "
        "only complete records[/bold]"
    )
    say(
        f"  (files of {FILE_SIZE} bytes, parts of {PART}: a commit sends the whole parts; the "
        "bytes after the last whole part are held back for the next commit or the seal)"
    )
    names: list[str] = []
    for _ in range(SEGMENTS):
        name = broker.name
        path = logs / name
        seg = store.segment(f"{PREFIX}{name}", path)
        for _ in range(3):
            broker.write(300)
            if broker.name != name:
                break
            valid = fmt.scan(str(path), 0, rolled=False).valid_end
            res = seg.commit(upto=valid).result()
            say(
                f"  commit {name} to {valid:>7}: {res.sent_parts} part(s) sent, "
                f"{res.carried_bytes:>7} held back"
            )
        if broker.name == name:
            broker.fill()
        names.append(name)
    keys = [f"{PREFIX}{n}" for n in names]

    say()
    say(
        "[bold]2. two files rolled (BLANK end written): sealed at full size, every local byte "
        "read again, completed, verified[/bold]"
    )
    for key, name in zip(keys[:-1], names[:-1], strict=True):
        scan = fmt.scan(str(logs / name), 0, rolled=True)
        assert scan.complete, scan
        res = store.segment(key, logs / name).seal(size=scan.valid_end).result()
        say(
            f"  sealed {name}: {'verified' if res.verified else 'NOT VERIFIED'}, etag {res.object_etag}"
        )

    say()
    say(
        "[bold]3. the RocketMQ failure: the final commit of the last full segment fails and "
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
    gc.collect()  # the uploader logs the failure nobody retrieved (ERROR on stderr)
    check = open_store(manifest, remote, part_size=PART, min_part_size=PART)
    show("manifest after the ignored failure", legend=True)
    last = check.manifest.segment(keys[-1])
    assert last is not None
    visible = check.storage.head(keys[-1])
    say(
        f"  {names[-1]} is {last.state.value}; its tail is recorded as pending; "
        + (
            "nothing is visible at its key yet (objects appear only whole)"
            if visible is None
            else "AN OBJECT IS AT ITS KEY ALREADY"
        )
    )
    lost_before = last.state.value != "verified" and visible is None

    say()
    say("[bold]4. the recovery job finishes it (re-sending only what is missing)[/bold]")
    report = check.recover()
    for o in report.outcomes:
        say(f"  {o.key.removeprefix(PREFIX)}: {o.before} -> {o.after}: {o.detail}")
    say(
        f"  {report.bytes_sent} bytes sent, {report.bytes_reused} bytes already at the remote "
        "(reused)"
    )
    show("manifest after recovery")

    say()
    say(
        "[bold]5. byte-for-byte check of every object against its local file, and every "
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
        say(
            f"  {name}: {len(local)} bytes, {'identical' if same else 'DIFFERENT'}, "
            f"{len(records)} records, CRCs {'ok' if crcs else 'BAD'}"
        )
    status = check.status()
    ok = ok and status.all_verified
    deletable = [s.key.removeprefix(PREFIX) for s in check.deletable()]
    check.close()
    say(f"  deletable locally now (verified): {len(deletable)} of {len(names)} files")
    console.rule(
        f"{'all segments verified' if ok else 'SOMETHING IS NOT VERIFIED'} "
        f"in {time.monotonic() - started:.1f} s"
    )
    return ok
