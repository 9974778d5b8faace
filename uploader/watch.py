"""``uploader watch DIR``: a sidecar that tails a directory of rolling segment files.

A broker (RocketMQ's commit log, Kafka's log segments) writes files named by their first offset,
so the name order is the write order: every file but the newest is complete. Each *tick*:

1. files matching the pattern that the manifest does not know are registered (key = prefix + name);
2. every open segment that has a newer file, or that reached ``segment_size``, is sealed;
3. the newest is committed: its new whole parts are recorded ``pending`` and sent.

Everything the watcher knows is in the manifest, so a restart picks up where it stopped: sealed and
verified files are skipped, open ones are reopened by key. Failures are logged and left ``pending``
for the next tick or for ``uploader recover``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from uploader.errors import SegmentBusyError, UploaderError, UsageError
from uploader.states import SegmentState
from uploader.store import CommitResult, Segment, Store, UploadFuture

log = logging.getLogger("uploader.watch")

DEFAULT_PATTERN = "[0-9]*"


@dataclass
class TickReport:
    registered: list[str] = field(default_factory=list)
    committed: dict[str, int] = field(default_factory=dict)  # key -> bytes sent
    sealed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


def segment_files(directory: Path, pattern: str) -> list[Path]:
    """Regular files of ``directory`` whose name matches ``pattern``, in name (= offset) order."""
    names = sorted(
        e.name
        for e in os.scandir(directory)
        if e.is_file(follow_symlinks=False)
        and not e.name.startswith(".")
        and fnmatch.fnmatchcase(e.name, pattern)
    )
    return [directory / n for n in names]


def check_directory(directory: Path, pattern: str) -> None:
    """Refuse a missing directory, or one with files of which none looks like a segment."""
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory to watch")
    if segment_files(directory, pattern):
        return
    others = [e.name for e in os.scandir(directory) if e.is_file() and not e.name.startswith(".")]
    if others:
        raise UsageError(
            f"{directory}: none of its {len(others)} files (e.g. {others[0]!r}) matches the "
            f"segment pattern {pattern!r}; pass --pattern to say which files are segments"
        )


class Watcher:
    """Ship the segments of one directory; call :meth:`tick` periodically or :meth:`run`."""

    def __init__(
        self,
        store: Store,
        directory: str | os.PathLike[str],
        *,
        key_prefix: str | None = None,
        pattern: str = DEFAULT_PATTERN,
        segment_size: int | None = None,
        on_result: Callable[[str, CommitResult], None] | None = None,
        on_error: Callable[[str, str, BaseException], None] | None = None,
    ) -> None:
        self.store = store
        self.directory = Path(directory).resolve()
        check_directory(self.directory, pattern)
        prefix = key_prefix if key_prefix is not None else self.directory.name + "/"
        self.key_prefix = prefix
        self.pattern = pattern
        self.segment_size = segment_size
        self.on_result = on_result
        self.on_error = on_error
        self._segments: dict[str, Segment] = {}
        self._done: set[str] = set()  # keys sealed or finished: nothing more to do here

    def _segment(self, path: Path, report: TickReport) -> Segment | None:
        key = self.key_prefix + path.name
        if key in self._done:
            return None
        seg = self._segments.get(key)
        if seg is None:
            known = self.store.manifest.segment(key) is not None
            try:
                seg = self.store.segment(key, path)
            except SegmentBusyError as exc:
                # Leased by a previous watcher that died: its lease expires, then we take over.
                log.info("%s", exc)
                return None
            if not known:
                report.registered.append(key)
            self._segments[key] = seg
        if seg.state is not SegmentState.OPEN:
            self._done.add(key)
            return None
        return seg

    def _wait(
        self, key: str, what: str, fut: UploadFuture[CommitResult], report: TickReport
    ) -> CommitResult | None:
        try:
            result = fut.result()
        except UploaderError as exc:
            report.errors.append((key, str(exc)))
            log.error("%s of %s failed (left pending for a retry): %s", what, key, exc)
            if self.on_error is not None:
                self.on_error(key, what, exc)
            return None
        if self.on_result is not None:
            self.on_result(key, result)
        return result

    def tick(self) -> TickReport:
        """One pass over the directory."""
        report = TickReport()
        files = segment_files(self.directory, self.pattern)
        seals: list[tuple[str, UploadFuture[CommitResult]]] = []
        commits: list[tuple[str, UploadFuture[CommitResult]]] = []
        for i, path in enumerate(files):
            try:
                seg = self._segment(path, report)
                if seg is None:
                    continue
                newest = i == len(files) - 1
                full = self.segment_size is not None and path.stat().st_size >= self.segment_size
                if not newest or full:
                    seals.append((seg.key, seg.seal()))
                else:
                    commits.append((seg.key, seg.commit()))
            except UploaderError as exc:
                report.errors.append((self.key_prefix + path.name, str(exc)))
                log.error("%s: %s", path, exc)
        for key, fut in seals:
            result = self._wait(key, "seal", fut, report)
            self._done.add(key)  # sealed (or recorded sealed): recovery finishes it if needed
            if result is not None:
                report.sealed.append(key)
                report.committed[key] = result.sent_bytes
        for key, fut in commits:
            result = self._wait(key, "commit", fut, report)
            if result is not None:
                report.committed[key] = result.sent_bytes
        return report

    def run(self, *, interval: float, stop: threading.Event) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set (SIGTERM/SIGINT in the CLI)."""
        while not stop.is_set():
            self.tick()
            stop.wait(interval)
