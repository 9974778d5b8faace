"""A test producer that writes a real RocketMQ-format commit log, scaled down.

Like a broker: files named by their 20-digit starting offset, created at full size (zeros), the
next one preallocated before it is needed, records written in place through mmap (the head first,
the rest in a second copy, so a racing reader sees heads before bodies), a BLANK head when the next
message does not fit (its filler bytes left as garbage), and a periodic msync.

:func:`encode_message` builds one record the way ``MessageExtEncoder`` lays it out; the unit tests
use it to hand-build files. Run as a script it writes a log until killed (for bench scripts)::

    python -m tests.formats.producer DIR --file-size 8388608
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import threading
from pathlib import Path

from uploader.formats.rocketmq import (
    END_FILE_MIN_BLANK_LENGTH,
    blank_head,
    encode_message,
)

__all__ = ["CommitLogProducer", "blank_head", "encode_message", "file_name"]


def file_name(offset: int) -> str:
    """``UtilAll.offset2FileName``: the starting offset, 20 digits."""
    return f"{offset:020d}"


class CommitLogProducer:
    """Writes messages into ``directory`` like a broker; :attr:`written` says what is complete.

    ``written[name]`` is the end of the last completely written record of each file (the file
    size once its BLANK head is written): no reader may ever call bytes past it valid.
    """

    def __init__(
        self,
        directory: Path,
        *,
        file_size: int = 1 << 20,
        seed: int = 0,
        max_body: int = 4096,
        flush_every: int = 16,
    ) -> None:
        self.directory = directory
        self.file_size = file_size
        self.rng = random.Random(seed)
        self.max_body = max_body
        self.flush_every = flush_every
        self.written: dict[str, int] = {}
        self.records: dict[str, list[tuple[int, int]]] = {}  # name -> (offset, length) of messages
        self.lock = threading.Lock()  # held while a record is half written
        self.offset = 0  # the log's physical offset of the next write
        self._maps: dict[str, mmap.mmap] = {}
        self._count = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._open(0)

    # --- files -----------------------------------------------------------------------------------

    def _create(self, start: int) -> None:
        path = self.directory / file_name(start)
        if path.exists():
            return
        with path.open("wb") as f:
            f.truncate(self.file_size)  # preallocated at full size: zeros until written

    def _open(self, start: int) -> None:
        self._create(start)
        self._create(start + self.file_size)  # like AllocateMappedFileService: the next, ahead
        name = file_name(start)
        fd = os.open(self.directory / name, os.O_RDWR)
        try:
            self._maps[name] = mmap.mmap(fd, self.file_size)
        finally:
            os.close(fd)
        self.written.setdefault(name, 0)
        self.records.setdefault(name, [])
        self.current = name
        self.file_start = start

    @property
    def names(self) -> list[str]:
        return sorted(self.written)

    # --- writing ---------------------------------------------------------------------------------

    def _message(self) -> bytes:
        n = self.rng.randrange(0, self.max_body + 1)
        name = self.rng.choice([b"TopicTest", b"orders", b"t" * 130])  # > 127 bytes: v2
        props = b"KEYS\x01k%d\x02TAGS\x01tagA" % self._count if self.rng.random() < 0.7 else b""
        return encode_message(
            self.rng.randbytes(n),
            topic=name,
            properties=props,
            queue_offset=self._count,
            physical_offset=self.offset,
            v2=len(name) > 127,
            born_v6=self.rng.random() < 0.2,
            store_v6=self.rng.random() < 0.1,
            property_crc=self.rng.random() < 0.3,
        )

    def next_record(self) -> bytes:
        """The next message, encoded for where it goes. If it does not fit in what is left of the
        current file (it needs its length plus 8 bytes), the BLANK is written first and the log
        rolls to the next file, as ``CommitLog.doAppend`` does."""
        record = self._message()
        pos = self.written[self.current]
        if len(record) + END_FILE_MIN_BLANK_LENGTH > self.file_size - pos:
            m = self._maps[self.current]
            remaining = self.file_size - pos
            m[pos + 8 : self.file_size] = bytes([0xA5]) * (remaining - 8)  # filler: anything
            m[pos : pos + 8] = blank_head(remaining)
            m.flush()
            self.written[self.current] = self.file_size
            self.offset += remaining
            m.close()
            self._open(self.file_start + self.file_size)
            record = self._message()
        return record

    def write_partial(self, record: bytes, head_cut: int, rest_cut: int) -> int:
        """Write only ``record[:head_cut]`` and ``record[8 : 8 + rest_cut]`` where ``record`` goes
        (what a reader racing a forward copy may see); returns its offset. :attr:`written` stays."""
        pos = self.written[self.current]
        m = self._maps[self.current]
        m[pos : pos + head_cut] = record[:head_cut]
        m[pos + 8 : pos + 8 + rest_cut] = record[8 : 8 + rest_cut]
        return pos

    def write_one(self) -> None:
        """Write one message (rolling to a new file first if it does not fit): its head first, then
        all of it, as two copies (a racing reader may see the head alone)."""
        record = self.next_record()
        with self.lock:
            self.write_partial(record, 8, 0)
            self.finish(record)

    def finish(self, record: bytes) -> None:
        """Write all of ``record`` where it goes and count it written."""
        pos = self.written[self.current]
        m = self._maps[self.current]
        m[pos : pos + len(record)] = record
        self.written[self.current] = pos + len(record)
        self.records[self.current].append((pos, len(record)))
        self.offset += len(record)
        self._count += 1
        if self._count % self.flush_every == 0:
            m.flush()  # msync

    def run(self, stop: threading.Event, *, files: int | None = None) -> None:
        """Write until ``stop`` is set, or until ``files`` files are complete."""
        while not stop.is_set():
            if files is not None and len(self.written) > files:
                break
            self.write_one()

    def close(self) -> None:
        for m in self._maps.values():
            if not m.closed:
                m.flush()
                m.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--file-size", type=int, default=8 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=None, help="stop after this many files")
    args = parser.parse_args()
    producer = CommitLogProducer(args.directory, file_size=args.file_size, seed=args.seed)
    try:
        producer.run(threading.Event(), files=args.files)
    finally:
        producer.close()


if __name__ == "__main__":
    main()
