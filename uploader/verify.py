"""Checking verified objects again: ``store.verify()``, the scrub, and the deletion gate's look.

Words:

* **check**: compare the object at a verified segment's key with what the seal recorded (one
  HEAD: size and ETag; ``deep`` reads it back and compares every part's MD5 and CRC32C).
* **drift**: a verified object found missing or different at the remote (a lifecycle rule, a
  mistaken delete, another writer). The segment leaves ``verified`` at once (audited): back to
  ``sealed`` with every part ``pending`` while the local bytes still match their checksums (the
  one driver then uploads it again, removing exactly the object that is there if it must), or
  ``failed`` with "remote object lost and local file gone" when they do not.
* **scrub**: checking every verified segment over time, the longest unchecked first
  (``checked_at``), at a bounded rate for deep reads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uploader.digest import normalize_etag
from uploader.errors import (
    LocalFileError,
    ObjectChangedError,
    SegmentBusyError,
    StorageError,
    UploaderError,
)
from uploader.outage import Backoff, OutageGuard
from uploader.records import SegmentRecord
from uploader.states import SegmentState
from uploader.transport import check_local

if TYPE_CHECKING:
    from uploader.crew import Crew

log = logging.getLogger("uploader.verify")

NOT_VERIFIED = "not verified yet"
#: A check that could not judge the object: it kept changing while it was read back, or the
#: remote failed the check (the scrub). Not drift.
NOT_JUDGED = "not judged"


@dataclass(frozen=True, slots=True)
class Check:
    """One segment checked again."""

    key: str
    ok: bool
    problem: str | None = None
    action: str = ""  # what was done about a problem
    state: str = SegmentState.VERIFIED.value  # the segment's state afterwards

    @property
    def not_judged(self) -> bool:
        """The check could not judge the object (see :data:`NOT_JUDGED`)."""
        return (self.problem or "").startswith(NOT_JUDGED)

    @property
    def drift(self) -> bool:
        """The object of a verified segment was found missing or different."""
        not_verified = (self.problem or "").startswith(NOT_VERIFIED)
        return not self.ok and not not_verified and not self.not_judged

    def as_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "ok": self.ok,
            "problem": self.problem,
            "action": self.action,
            "state": self.state,
            "drift": self.drift,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    checks: tuple[Check, ...] = ()
    deep: bool = False

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def drifted(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.checks if c.drift)

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": len(self.checks),
            "deep": self.deep,
            "ok": self.ok,
            "results": [c.as_dict() for c in self.checks],
        }


def check_one(crew: Crew, rec: SegmentRecord, *, deep: bool, repair: bool) -> Check:
    """Check one segment's object; on drift, record it and (``repair``, this node) upload again."""
    if rec.state is not SegmentState.VERIFIED:
        return Check(
            rec.key,
            False,
            f"{NOT_VERIFIED} ({rec.state.value}): nothing to compare with yet; the writer's seal "
            "or `uploader recover` finishes it",
            state=rec.state.value,
        )
    try:
        problem = crew.driver.check_object(rec, deep=deep)
    except ObjectChangedError as exc:
        # Not drift (nothing says our object is gone), and no reason to stop the other checks.
        return Check(rec.key, False, f"{NOT_JUDGED}: {exc}", "none; the next pass looks again")
    if problem is None:
        crew.manifest.checked(rec.id)
        return Check(rec.key, True)
    log.error("segment %r: the verified object drifted at the remote: %s", rec.key, problem)
    return drift(crew, rec, problem, repair=repair)


def drift(crew: Crew, rec: SegmentRecord, problem: str, *, repair: bool) -> Check:
    """The verified object of ``rec`` is missing or different: the segment leaves ``verified``."""
    try:
        lease = crew.manifest.acquire(rec.key, crew.worker, crew.lease_seconds, node=crew.node)
    except SegmentBusyError as exc:
        return Check(rec.key, False, problem, f"not changed: {exc}")
    crew.keeper.hold(lease)
    try:
        commits = crew.manifest.commits(rec.id)
        if rec.node == crew.node:
            try:
                check_local(rec, commits, set())
            except LocalFileError as exc:
                if not exc.retryable:
                    reason = f"remote object lost and local file gone or changed: {problem}; {exc}"
                    crew.manifest.fail_segment(lease, reason)
                    return Check(rec.key, False, problem, f"failed: {reason}", "failed")
        info = crew.storage.head(rec.key)
        etag = None if info is None else normalize_etag(info.etag)
        remove = etag if etag is not None and etag != normalize_etag(rec.expected_etag) else None
        crew.manifest.drifted(
            lease, f"the verified object drifted at the remote: {problem}", remove_etag=remove
        )
        if not repair or rec.node != crew.node:
            where = "" if rec.node == crew.node else f" by a worker on node {rec.node!r}"
            return Check(
                rec.key, False, problem, f"sent back to be uploaded again{where}", "sealed"
            )
        result = crew.driver.drive(lease, release=True)
        return Check(
            rec.key,
            False,
            problem,
            f"uploaded again from the local file: {result.state.value}"
            + (f" ({result.detail})" if not result.verified else ""),
            result.state.value,
        )
    except (StorageError, LocalFileError) as exc:
        return Check(rec.key, False, problem, f"repair stopped: {exc}; recovery retries it")
    finally:
        with contextlib.suppress(UploaderError):
            crew.keeper.release(rec.id)


def verify(
    crew: Crew,
    records: Sequence[SegmentRecord],
    *,
    deep: bool = False,
    repair: bool = True,
    on_check: Callable[[Check], None] | None = None,
) -> VerifyReport:
    checks = []
    for rec in records:
        c = check_one(crew, rec, deep=deep, repair=repair)
        checks.append(c)
        if on_check is not None:
            on_check(c)
    return VerifyReport(tuple(checks), deep)


def scrub(
    crew: Crew,
    *,
    limit: int,
    deep: bool = False,
    rate: float | None = None,
    stop: threading.Event | None = None,
    on_check: Callable[[Check], None] | None = None,
) -> VerifyReport:
    """One scrub pass over up to ``limit`` verified segments, the longest unchecked first; a
    remote error ends the pass with that segment not judged (not drift).

    ``rate`` (bytes per second) bounds deep reads: after each segment the pass waits as long as
    reading it at that rate would take (a HEAD-only pass is not rate-bound).
    """
    checks = []
    for rec in crew.manifest.to_scrub(limit):
        if stop is not None and stop.is_set():
            break
        started = time.monotonic()
        remote_failed = False
        try:
            c = check_one(crew, rec, deep=deep, repair=True)
        except StorageError as exc:
            # The remote failed this check past its retries. Nothing is judged, and the pass ends
            # here: the rest would meet the same remote. This segment, still the longest
            # unchecked, comes first in the next pass (the scrub's daemon keeps going).
            log.error("scrub: segment %r not checked: %s; the pass stops here", rec.key, exc)
            c = Check(rec.key, False, f"{NOT_JUDGED}: remote error: {exc}", "the next pass")
            remote_failed = True
        checks.append(c)
        if on_check is not None:
            on_check(c)
        if remote_failed:
            break
        if deep and rate and rec.size:
            pause = rec.size / rate - (time.monotonic() - started)
            if pause > 0:
                (stop or threading.Event()).wait(pause)
    return VerifyReport(tuple(checks), deep)


def scrub_loop(
    crew: Crew,
    *,
    interval: float,
    stop: threading.Event,
    limit: int,
    deep: bool = False,
    rate: float | None = None,
    on_check: Callable[[Check], None] | None = None,
    on_report: Callable[[VerifyReport], None] | None = None,
    backoff: Backoff | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> VerifyReport:
    """Scrub passes every ``interval`` seconds until ``stop`` is set; return the last report.

    A pass the manifest's outage cut short (:mod:`uploader.outage`) is logged and run again after
    a bounded, jittered backoff; any other error ends the loop.
    """
    guard = OutageGuard("scrub", backoff=backoff, clock=clock)
    report = VerifyReport(deep=deep)
    while not stop.is_set():
        try:
            report = scrub(crew, limit=limit, deep=deep, rate=rate, stop=stop, on_check=on_check)
        except Exception as exc:
            if not guard.survive(exc, stop):
                raise
            continue
        guard.ok()
        if on_report is not None:
            on_report(report)
        stop.wait(interval)
    return report
