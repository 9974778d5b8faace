"""Acknowledged parts on their way to the manifest: written in chunks, never in a part's slot.

A part the remote acknowledged is ``uploaded`` only once the manifest says so; until then a crash
leaves it ``pending``, and the next drive must learn what the remote holds (ListParts) before it
can adopt it. Where the listing proves the part (its MD5 ETag; its CRC32C where the remote shows
it) that costs a re-check; where it cannot (the crc32c mode on a remote whose ListParts shows no
checksums, such as moto) the part is sent again. Two ways of writing acknowledgements are both
wrong for a long drive: one transaction per part costs a transaction per part (and used to hold
the part's slot through it), and one transaction at the end of the drive lets a crash near its
end cost every part it sent.

So an :class:`AckBook` collects what the send threads were told and the thread that submits the
parts writes it whenever :data:`CHUNK` acknowledgements are waiting, right before it waits for a
free slot (it holds none then, and waiting is what it would otherwise do), and writes the rest
when the sends are done. A crash costs at most ``CHUNK`` plus the slots' worth of parts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uploader.records import CommitRecord

#: While parts are still being submitted, a write is made once this many acknowledgements wait
#: (it takes every one waiting: up to ``CHUNK - 1`` plus the slots' worth).
CHUNK = 8


@dataclass(frozen=True, slots=True)
class Ack:
    """What the remote acknowledged for one part, not yet written to the manifest."""

    commit: CommitRecord
    etag: str
    proven: bool  # the remote echoed the part's own CRC32C with another ETag (SSE-KMS)


class AckBook:
    """The acknowledgements of one drive or one commit: added by the send threads, written by
    ``write`` (one transaction per call) from the submitting thread only."""

    def __init__(self, write: Callable[[Sequence[Ack]], None], chunk: int = CHUNK) -> None:
        self._write = write
        self._chunk = chunk
        self._lock = threading.Lock()
        self._waiting: list[Ack] = []
        self._written: set[int] = set()

    def add(self, ack: Ack) -> None:
        """A part the remote acknowledged (from any thread)."""
        with self._lock:
            self._waiting.append(ack)

    def write_due(self) -> None:
        """Write what is waiting if it is a chunk or more (between two parts' submissions)."""
        with self._lock:
            due = len(self._waiting) >= self._chunk
        if due:
            self.write_rest()

    def write_rest(self) -> None:
        """Write everything waiting (once the sends are done). What a failed write held stays
        waiting, and is not counted as written."""
        with self._lock:
            batch = list(self._waiting)
        if not batch:
            return
        self._write(batch)
        with self._lock:
            del self._waiting[: len(batch)]  # added meanwhile: kept, behind the batch
            self._written.update(a.commit.id for a in batch)

    @property
    def written(self) -> frozenset[int]:
        """The commit ids whose acknowledgement the manifest holds."""
        with self._lock:
            return frozenset(self._written)
