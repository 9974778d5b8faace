"""``uploader watch DIR``: a sidecar that tails a directory of rolling segment files.

A broker (RocketMQ's commit log, Kafka's log segments) writes files named by their first offset,
so the name order is the write order: every file but the newest is complete. Each *tick*:

1. files matching the pattern that the manifest does not know are registered (key = prefix + name);
2. the segment's :class:`~uploader.formats.Format` says how far each open file is valid and whether
   it is complete; a file is *rolled* once a later file has begun (for ``append`` and ``whole``: a
   later file exists, or the file reached ``segment_size``; RocketMQ preallocates the next file, so
   there a later file must hold a record head);
3. complete files are sealed (at the format's end), the others committed up to their valid end:
   new whole parts are recorded ``pending`` and sent.

A file whose format reports a ``problem`` (a corrupt RocketMQ chain, or one that stopped although
the broker moved on) is committed no further and neither sealed: it is reported in every tick's
``errors`` and :attr:`Watcher.problems` until its bytes become readable again.

Everything the watcher knows is in the manifest, so a restart picks up where it stopped: verified
files are skipped, open ones are reopened by key (a dead predecessor's lease on this node is taken
at once, see :mod:`uploader.holders`), and files it sealed but did not finish are finished. Failures
are logged and left ``pending`` for the next tick or for ``uploader recover``; a seal that failed
while the segment is still ``open`` (its lease was lost and is held by another process, the file
could not be read) is tried again on the next tick.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from uploader.errors import SegmentBusyError, UploaderError, UsageError
from uploader.formats import Format, Scan, get_format
from uploader.outage import Backoff, OutageGuard
from uploader.records import FORMAT_PROBLEM
from uploader.recovery import Owed, RecoveryReport
from uploader.states import SegmentState
from uploader.store import CommitResult, Segment, Store, UploadFuture

log = logging.getLogger("uploader.watch")

DEFAULT_PATTERN = "[0-9]*"


@dataclass
class TickReport:
    registered: list[str] = field(default_factory=list)
    committed: dict[str, int] = field(default_factory=dict)  # key -> bytes sent
    sealed: list[str] = field(default_factory=list)
    #: Files a previous watcher sealed but did not finish, driven to verified by this tick.
    finished: list[str] = field(default_factory=list)
    #: Files another live process holds the lease of (tried again next tick).
    busy: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # key -> why it cannot go further


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
    if directory.is_file():
        raise UsageError(
            f"{directory}: is a file; `uploader watch` tails a directory of rolling segments "
            "(`uploader ship FILE` ships one file)"
        )
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
        format: str | Format = "append",
        on_result: Callable[[str, CommitResult], None] | None = None,
        on_error: Callable[[str, str, BaseException], None] | None = None,
        on_problem: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.directory = Path(directory).resolve()
        check_directory(self.directory, pattern)
        self.format = get_format(format) if isinstance(format, str) else format
        if segment_size is not None and self.format.preallocated:
            raise UsageError(
                f"--segment-size means nothing for the {self.format.name!r} format: its files are "
                "created at full size; the format itself says when a file is complete"
            )
        prefix = key_prefix if key_prefix is not None else self.directory.name + "/"
        self.key_prefix = prefix
        self.pattern = pattern
        self.segment_size = segment_size
        self.on_result = on_result
        self.on_error = on_error
        self.on_problem = on_problem
        self._segments: dict[str, Segment] = {}
        self._done: set[str] = set()  # keys sealed or finished: nothing more to do here
        # Per open key, a record boundary already scanned (a scan resumes there). Not the committed
        # end: commits advance by whole parts, which end anywhere in a record. A restart rescans.
        self._boundary: dict[str, int] = {}
        #: Files that cannot go further (key -> the format's problem), as of the last tick.
        self.problems: dict[str, str] = {}
        self._busy: set[str] = set()  # keys found held by another live process, until free
        self._grouped: set[str] = set()  # keys sealed by ship_many (no Segment of the watcher)

    def _segment(self, path: Path, report: TickReport) -> Segment | None:
        key = self.key_prefix + path.name
        if key in self._done:
            return None
        seg = self._segments.get(key)
        try:
            if seg is None:
                known = self.store.manifest.segment(key) is not None
                seg = self.store.segment(key, path)
                if not known:
                    report.registered.append(key)
                self._segments[key] = seg
            else:
                # The store hands it back with a live lease: taken again if it was lost (this
                # process was paused past it) and is free.
                seg = self.store.segment(key, path)
        except SegmentBusyError as exc:
            # Another live process holds it (a recovery worker driving its parts, a second
            # watcher); a dead predecessor's lease on this node was taken over already. Again
            # next tick; said once per stretch, not every tick.
            self._report_busy(key, exc, report)
            return None
        self._busy.discard(key)
        state = seg.state
        if state is SegmentState.OPEN:
            return seg
        if state in (SegmentState.SEALED, SegmentState.UPLOADED) and self._finish(key, report):
            return None  # busy: again next tick
        self._done.add(key)
        return None

    def _finish(self, key: str, report: TickReport) -> bool:
        """Drive a file sealed by a previous watcher (killed before it was verified) to verified
        now, rather than at the next recovery pass. True if another process holds it."""
        try:
            outcome = self.store.finish(key)
        except SegmentBusyError as exc:
            self._report_busy(key, exc, report)
            return True
        except UploaderError as exc:  # recorded on the segment; `uploader recover` retries
            log.warning("%s: finishing its seal failed: %s", key, exc)
            return False
        if outcome.after == SegmentState.VERIFIED.value:
            report.finished.append(key)
        return False

    def _report_busy(self, key: str, exc: SegmentBusyError, report: TickReport) -> None:
        report.busy.append(key)
        if key not in self._busy:
            self._busy.add(key)
            log.warning("%s; tried again every tick until it is free", exc)

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

    def _rolled(self, files: list[Path]) -> list[bool]:
        """Per file: has a later one begun? Checked newest first, each file at most once."""
        rolled = [False] * len(files)
        later = False
        for i in range(len(files) - 1, -1, -1):
            rolled[i] = later
            if not later and i > 0:
                try:
                    later = self.format.begun(str(files[i]))
                except OSError as exc:  # gone since the listing: it says nothing
                    log.debug("%s: %s", files[i], exc)
        return rolled

    def _scan(self, key: str, path: Path, rolled: bool) -> Scan:
        if not rolled and not self.format.preallocated and self.segment_size is not None:
            rolled = path.stat().st_size >= self.segment_size
        scan = self.format.scan(str(path), self._boundary.get(key, 0), rolled=rolled)
        self._boundary[key] = scan.valid_end
        return scan

    def _problem(self, seg: Segment, problem: str, report: TickReport) -> None:
        key = seg.key
        report.problems[key] = problem
        report.errors.append((key, problem))
        if self.problems.get(key) != problem:  # say it once, not every tick
            log.error("%s: %s; nothing past it is committed, the file is not sealed", key, problem)
            # On the segment's row too, so that `uploader status` shows it (and exits 1).
            with contextlib.suppress(UploaderError):
                self.store.manifest.record_error(seg.lease, FORMAT_PROBLEM + problem)
            if self.on_problem is not None:
                self.on_problem(key, problem)

    def tick(self, *, seal_all: bool = False) -> TickReport:
        """One pass over the directory. ``seal_all``: see :meth:`seal_open`."""
        report = TickReport()
        files = segment_files(self.directory, self.pattern)
        # Whether a file rolled is decided before it is scanned: a broker finishes a file before
        # it writes the next, so a later file begun means this one's end is already there.
        rolled = [True] * len(files) if seal_all else self._rolled(files)
        explicit = self.format.preallocated  # only the format knows the end, not the file size
        seals: list[tuple[str, UploadFuture[CommitResult]]] = []
        commits: list[tuple[str, UploadFuture[CommitResult]]] = []
        # New files found rolled already (a backlog, a restart after a while): sealed together
        # by one store.ship_many (a group commit), not registered and sealed one by one.
        grouped: list[tuple[str, Path]] = []
        for i, path in enumerate(files):
            key = self.key_prefix + path.name
            try:
                if not explicit and rolled[i] and self._new(key):
                    scan = self._scan(key, path, True)
                    if scan.complete and scan.problem is None:
                        grouped.append((key, path))
                        continue
                seg = self._segment(path, report)
                if seg is None:
                    continue
                scan = self._scan(key, path, rolled[i])
                if scan.problem is not None:
                    self._problem(seg, scan.problem, report)
                if scan.complete:
                    fut = seg.seal(size=scan.valid_end) if explicit else seg.seal()
                    seals.append((key, fut))
                elif scan.valid_end > 0:
                    # append keeps today's call (the file size); whole is never valid before it
                    # is complete; a preallocated format passes its end explicitly.
                    fut = seg.commit(upto=scan.valid_end) if explicit else seg.commit()
                    commits.append((key, fut))
            except (UploaderError, OSError) as exc:
                report.errors.append((key, str(exc)))
                log.error("%s: %s", path, exc)
        self.problems = dict(report.problems)
        if grouped:
            seals += self._ship_grouped(grouped, report)
        for key, fut in seals:
            result = self._wait(key, "seal", fut, report)
            self._boundary.pop(key, None)
            if result is not None:
                self._done.add(key)
                report.sealed.append(key)
                report.committed[key] = result.sent_bytes
            elif not self._still_open(key):
                self._done.add(key)  # recorded sealed: recovery finishes it
            elif key in self._grouped:
                self._grouped.discard(key)  # not recorded: seen as a new file next tick
            # Still open (the seal was refused before it was recorded): sealed next tick.
        for key, fut in commits:
            result = self._wait(key, "commit", fut, report)
            if result is not None:
                report.committed[key] = result.sent_bytes
        return report

    def _still_open(self, key: str) -> bool:
        seg = self._segments.get(key)
        try:
            if seg is None and key in self._grouped:
                rec = self.store.manifest.segment(key)
                return rec is None or rec.state is SegmentState.OPEN
            return seg is not None and seg.state is SegmentState.OPEN
        except UploaderError:  # cannot tell now: look again next tick
            return True

    def _new(self, key: str) -> bool:
        """A file this watcher has not seen and the manifest does not know."""
        if key in self._segments or key in self._done:
            return False
        return self.store.manifest.segment(key) is None

    def _ship_grouped(
        self, grouped: list[tuple[str, Path]], report: TickReport
    ) -> list[tuple[str, UploadFuture[CommitResult]]]:
        try:
            futures = self.store.ship_many(grouped)
        except (UploaderError, OSError) as exc:  # nothing recorded: new files again next tick
            for key, _path in grouped:
                report.errors.append((key, str(exc)))
            log.error("sealing %d rolled file(s) failed: %s", len(grouped), exc)
            return []
        self._grouped.update(key for key, _path in grouped)
        report.registered += [key for key, _path in grouped]
        return [(key, fut) for (key, _path), fut in zip(grouped, futures, strict=True)]

    def seal_open(self) -> TickReport:
        """One last pass for a writer that stopped: every file is sealed as if the writer had
        rolled it, the newest (open) one included, and each seal waits until it is verified
        (``uploader watch --seal-on-exit``). A file the writer appends to later is then a file
        written after its seal (the deletion gate refuses it), so this is for a writer stopped
        for good or one that starts a new file when it starts again."""
        if self.format.preallocated:
            raise UsageError(
                f"the {self.format.name!r} format's newest file is preallocated and the writer "
                "continues it when it starts again: it is sealed when the writer rolls it, not "
                "on exit"
            )
        return self.tick(seal_all=True)

    def run(
        self,
        *,
        interval: float,
        stop: threading.Event,
        recover_every: float | None = None,
        on_recovery: Callable[[RecoveryReport], None] | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set (SIGTERM/SIGINT in the CLI).

        ``recover_every``: also run a recovery pass of this store that often (it finishes seals
        that did not, e.g. after a remote error), reported to ``on_recovery``. A manifest outage
        (:mod:`uploader.outage`) does not end the loop: it is logged, the loop backs off and
        ticks again; any other error ends it.
        """
        guard = OutageGuard("watch", backoff=backoff, clock=clock)
        last_recovery = clock()
        owed = Owed()  # what an outage kept a recovery pass from settling
        while not stop.is_set():
            try:
                self.tick()
                if recover_every is not None and clock() - last_recovery >= recover_every:
                    owed.settle(self.store.crew)
                    report = self.store.recover(stop=stop, owed=owed)
                    last_recovery = clock()
                    if on_recovery is not None:
                        on_recovery(report)
            except Exception as exc:
                if not guard.survive(exc, stop):
                    raise
                continue
            guard.ok()
            stop.wait(interval)
