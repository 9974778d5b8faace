"""What ``Segment.commit()`` and ``Segment.seal()`` hand back: a future and its result.

A failure nobody retrieved is logged when its future is collected; the manifest, not the future,
is what keeps the work (every unfinished part stays ``pending`` for the recovery job).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("uploader")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What one ``commit()`` or ``seal()`` did."""

    key: str
    sent_bytes: int  # bytes uploaded by this call
    sent_parts: int
    committed: int  # end of the bytes recorded in the manifest (offset)
    carried_bytes: int  # bytes appended but smaller than a part: they wait for a later commit/seal
    sealed: bool = False
    verified: bool = False
    object_etag: str | None = None


class UploadFuture(Future[T]):
    """A ``concurrent.futures.Future`` that logs a failure nobody retrieved.

    Logging is a courtesy: the manifest, not the future, is what keeps the work from being lost.
    """

    def __init__(self, description: str) -> None:
        super().__init__()
        self._description = description
        self._retrieved = False

    def result(self, timeout: float | None = None) -> T:
        self._retrieved = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._retrieved = True
        return super().exception(timeout)

    def __del__(self) -> None:
        if not self._retrieved and self.done() and not self.cancelled():
            exc = super().exception(0)
            if exc is not None:
                log.error(
                    "%s failed and nobody retrieved the result: %s; the manifest keeps it "
                    "pending and `uploader recover` will finish it",
                    self._description,
                    exc,
                )
