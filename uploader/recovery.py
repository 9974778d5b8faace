"""The recovery job: claim unfinished segments, drive each to ``verified``, release them.

Words:

* **claim**: take a segment's lease with a fresh fence token (``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL), so several workers on several hosts share the work and a worker whose lease expired
  can no longer change a row.
* **resume**: hand the claimed segment to the one driver (:mod:`uploader.driver`), which learns
  what the remote holds and takes the next step until the segment is verified, failed or blocked.
  Parts the remote already holds with the recorded MD5 are *reused*; missing ones are *re-sent*
  from the local file after its bytes were checked against the recorded digests.
* **sweep** (:mod:`uploader.sweep`): abort multipart uploads (and staged parts) under the remote
  root that no unfinished manifest row references.

The crew a worker works with is :mod:`uploader.crew`; what a pass reports,
:mod:`uploader.recovery_report`.

Every crash point has an answer (the cases of :func:`uploader.plan.next_step`):

======================================  ==========================================================
left behind                             what the driver does
======================================  ==========================================================
pending part that actually arrived      listed with the recorded MD5: reused
pending part that never arrived         re-sent from the local file (bytes checked first)
upload id the remote no longer knows    object at the key matching the seal? adopted as uploaded;
                                        a foreign object: ``failed``; else a fresh upload, every
                                        part re-sent
completed but completion not recorded   the object matches the seal: adopted as uploaded
completed object fails verification     its ETag recorded as the intent to remove it, removed
                                        *conditionally* on that ETag (only where the remote proved
                                        it honours the condition), re-sent (bounded), else
                                        ``failed`` with the object left alone
local bytes gone, changed or replaced   ``failed`` with the reason (never verified)
local bytes on another node             completed if all parts are uploaded; verified only by a
                                        worker on that node (the whole-file check reads them)
open segment (writer gone)              its pending whole parts are uploaded; it stays open: only
                                        its writer seals it
======================================  ==========================================================
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from uploader.config import DEFAULT_MAX_REUPLOADS, DEFAULT_STUCK_PASSES
from uploader.crew import Crew
from uploader.errors import (
    AccessDeniedError,
    LeaseLostError,
    LocalFileError,
    ManifestError,
    NoSuchBucketError,
    SegmentBusyError,
    StaleStateError,
    StorageError,
    UploaderError,
    VerificationError,
    WorkInterruptedError,
)
from uploader.manifest import db
from uploader.outage import Backoff, OutageGuard
from uploader.records import Lease, SegmentRecord
from uploader.recovery_report import RecoveryReport, SegmentOutcome
from uploader.stalled import find_stalled
from uploader.states import SegmentState
from uploader.sweep import DEFAULT_SWEEP_AGE, SweepReport, sweep
from uploader.transport import Counters

log = logging.getLogger("uploader.recovery")


# Crew, the reports and the sweep live in their own modules; importable from here as before.
__all__ = [
    "DEFAULT_MAX_REUPLOADS",
    "DEFAULT_STUCK_PASSES",
    "DEFAULT_SWEEP_AGE",
    "Crew",
    "RecoveryReport",
    "SegmentOutcome",
    "SweepReport",
    "recover",
    "recover_loop",
    "resume_key",
    "sweep",
]


@dataclass
class Owed:
    """What a manifest outage kept a worker from settling, settled by :func:`recover_loop` once
    the manifest answers: leases it could not give back, and whether a claim's answer was lost
    (the claim may have committed, leasing segments to us that no thread of ours holds)."""

    leases: list[Lease] = field(default_factory=list)
    claims: list[datetime] = field(default_factory=list)  # when each unanswered claim was made

    def settle(self, crew: Crew) -> None:
        while self.leases:
            # Fenced: a no-op if the lease expired and another worker took the segment.
            crew.manifest.release(self.leases[0])
            self.leases.pop(0)
        while self.claims:
            for key in crew.manifest.give_back_unheld(crew.worker, self.claims[0], crew.keeper.get):
                log.warning(
                    "segment %r: leased to this worker by a claim whose answer an outage lost, "
                    "held by no thread; given back, so it is not left idle until the lease expires",
                    key,
                )
            self.claims.pop(0)


@dataclass
class _Totals:
    outcomes: list[SegmentOutcome] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)


def recover(
    crew: Crew,
    *,
    limit: int | None = None,
    max_reuploads: int = DEFAULT_MAX_REUPLOADS,
    stop: threading.Event | None = None,
    on_segment: Callable[[SegmentOutcome], None] | None = None,
    stuck_passes: int = DEFAULT_STUCK_PASSES,
    owed: Owed | None = None,
) -> RecoveryReport:
    """One pass over the unfinished segments this worker can act on.

    Claims them in batches in id order (others are claimed by other workers meanwhile), drives
    each, releases it. ``limit`` bounds the number of claims; ``stop`` ends the pass after the
    batch in hand (graceful shutdown). What the manifest's outage kept it from settling (a
    lease it could not give back, a claim whose answer was lost) is noted in ``owed``
    (:func:`recover_loop` settles it once the manifest answers again, instead of leaving the
    segments idle until their leases expire).
    """
    totals = _Totals()
    after_id = 0
    batch = max(1, crew.concurrency)
    while limit is None or len(totals.outcomes) < limit:
        if stop is not None and stop.is_set():
            break
        want = batch if limit is None else min(batch, limit - len(totals.outcomes))
        # One transaction claims a batch; the batch is driven in parallel (its parts share the
        # store's slots, so memory stays bounded), then every lease is released.
        at = crew.manifest.clock()
        try:
            claimed = crew.manifest.claim(
                crew.worker,
                node=crew.node,
                ttl=crew.lease_seconds,
                after_id=after_id,
                limit=want,
                at=at,
            )
        except Exception as exc:
            if owed is not None and db.is_outage(exc):
                owed.claims.append(at)  # it may have committed all the same
            raise
        if not claimed:
            break
        after_id = claimed[-1][1].id
        for lease, _seg in claimed:
            crew.keeper.hold(lease)

        def work(item: tuple[Lease, SegmentRecord]) -> SegmentOutcome:
            lease, seg = item
            try:
                return _resume(crew, lease, seg, max_reuploads, totals.counters, stuck_passes)
            finally:
                _release(crew, lease, owed)

        if len(claimed) == 1:
            outcomes = [work(claimed[0])]
        else:
            with ThreadPoolExecutor(len(claimed), thread_name_prefix="uploader-recover") as ex:
                outcomes = list(ex.map(work, claimed))
        for outcome in outcomes:
            totals.outcomes.append(outcome)
            if on_segment is not None:
                on_segment(outcome)
    if (limit is None or len(totals.outcomes) < limit) and not (stop is not None and stop.is_set()):
        for outcome in _fail_stalled(crew):
            totals.outcomes.append(outcome)
            if on_segment is not None:
                on_segment(outcome)
    c = totals.counters
    return RecoveryReport(
        outcomes=tuple(totals.outcomes),
        bytes_sent=c.bytes_sent,
        bytes_reused=c.bytes_reused,
        parts_sent=c.parts_sent,
        parts_reused=c.parts_reused,
    )


def _release(crew: Crew, lease: Lease, owed: Owed | None) -> None:
    """Give a claimed lease back; one the manifest's outage kept is remembered in ``owed``
    (the outage still ends the pass: the caller sees the error)."""
    try:
        crew.keeper.release(lease.segment_id)
    except UploaderError:
        pass  # lost meanwhile: nothing of ours to give back
    except Exception as exc:
        if owed is not None and db.is_outage(exc):
            owed.leases.append(lease)
        raise


def _fail_stalled(crew: Crew) -> list[SegmentOutcome]:
    """Open segments of this node whose local file vanished or shrank below the committed end,
    once their writer's lease is gone: ``failed`` with that reason (their bytes can never be
    sealed). A live writer keeps its lease, and its segment is left to it."""
    outcomes = []
    for key, why in find_stalled(crew.manifest, crew.node):
        try:
            lease = crew.manifest.acquire(key, crew.worker, crew.lease_seconds, node=crew.node)
        except (SegmentBusyError, UploaderError):
            continue
        crew.keeper.hold(lease)
        try:
            reason = f"local bytes unusable: {why}; the open segment can never be sealed"
            crew.manifest.fail_segment(lease, reason)
            log.error("segment %r failed: %s", key, reason)
            outcomes.append(SegmentOutcome(key=key, before="open", after="failed", detail=reason))
        except UploaderError as exc:  # moved meanwhile (sealed by a writer): not ours to judge
            log.warning("segment %r: %s", key, exc)
        finally:
            with contextlib.suppress(UploaderError):
                crew.keeper.release(lease.segment_id)
    return outcomes


def resume_key(
    crew: Crew,
    key: str,
    *,
    max_reuploads: int = DEFAULT_MAX_REUPLOADS,
    stuck_passes: int = DEFAULT_STUCK_PASSES,
) -> SegmentOutcome:
    """Claim one segment by key (free or expired lease, else :class:`SegmentBusyError`) and
    drive it as a recovery pass would: ``uploader ship`` of a sealed, unfinished segment and
    ``uploader retry`` use it."""
    lease = crew.manifest.acquire(key, crew.worker, crew.lease_seconds, node=crew.node)
    crew.keeper.hold(lease)
    try:
        seg = crew.manifest.segment_by_id(lease.segment_id)
        return _resume(crew, lease, seg, max_reuploads, Counters(), stuck_passes)
    finally:
        with contextlib.suppress(UploaderError):
            crew.keeper.release(lease.segment_id)


def _resume(
    crew: Crew,
    lease: Lease,
    seg: SegmentRecord,
    max_reuploads: int,
    totals: Counters,
    stuck_passes: int = DEFAULT_STUCK_PASSES,
) -> SegmentOutcome:
    counters = Counters()
    before = seg.state.value
    detail = ""
    lost = False
    try:
        result = crew.driver.drive(
            lease, counters=counters, release=True, max_reuploads=max_reuploads
        )
        detail = result.blocked or ""
    except (LeaseLostError, StaleStateError) as exc:
        detail = f"another worker took it over: {exc}"
        lost = True
        log.warning("%s", detail)
    except WorkInterruptedError as exc:
        detail = str(exc)  # parts in flight were recorded; the rest stays pending
    except (StorageError, VerificationError, ManifestError, LocalFileError) as exc:
        # Recorded on the segment by the driver (attempts, last error); a later pass retries.
        detail = str(exc)
        if _incurable(exc):
            detail = _stuck(crew, lease, seg, str(exc), stuck_passes) or detail
        else:
            log.warning("segment %r stays unfinished: %s", seg.key, exc)
    after = crew.manifest.segment_by_id(seg.id)
    if not lost and after.fence != lease.fence:
        # Claimed by someone else meanwhile (we were paused): whatever state it reached is theirs.
        lost = True
        detail = f"another worker took it over (fence {lease.fence}, now {after.fence})"
    if lost:
        pass  # what the other worker did is its report's business
    elif after.state is SegmentState.FAILED:
        detail = after.reason or detail
    elif after.state is SegmentState.VERIFIED:
        detail = f"verified, {after.size} bytes"
    elif after.state is SegmentState.OPEN and not detail:
        detail = "pending parts uploaded; the segment stays open for its writer to seal"
    if not lost and after.state in (SegmentState.UPLOADED, SegmentState.VERIFIED):
        _count_reused(crew, after, counters)
    totals.add(counters)
    return SegmentOutcome(
        key=seg.key,
        before=before,
        after=after.state.value,
        bytes_sent=counters.bytes_sent,
        bytes_reused=counters.bytes_reused,
        detail=detail,
        lost=lost,
    )


def _count_reused(crew: Crew, seg: SegmentRecord, counters: Counters) -> None:
    """The object is complete at the remote: every byte of it this pass did not send was
    already there (sent before the crash, or adopted), so it counts as reused. Without this a
    partial resend reported "0 reused" although it sent only what was missing."""
    if seg.size is None:
        return
    parts = crew.manifest.progress(seg.id).parts
    with counters.lock:
        counters.bytes_reused = max(counters.bytes_reused, seg.size - counters.bytes_sent)
        counters.parts_reused = max(counters.parts_reused, parts - counters.parts_sent)


def _incurable(exc: Exception) -> bool:
    """An error of this segment's calls that retrying cannot cure. Credentials and a missing
    bucket are the whole remote's configuration, not a segment's: they never fail segments."""
    return (
        isinstance(exc, StorageError)
        and not exc.retryable
        and not isinstance(exc, AccessDeniedError | NoSuchBucketError)
    )


def _stuck(crew: Crew, lease: Lease, seg: SegmentRecord, error: str, limit: int) -> str | None:
    """Count this pass as one more ending on ``error``; at ``limit`` in a row, ``failed`` with it.
    Returns the failure's reason, or None while the segment is left for another pass."""
    try:
        run = crew.manifest.record_stuck(lease, error)
    except UploaderError as exc:  # lost the lease meanwhile: the new holder decides
        log.warning("segment %r: %s", seg.key, exc)
        return None
    if run < limit:
        log.warning(
            "segment %r stays unfinished (pass %d of %d ending on this error): %s",
            seg.key,
            run,
            limit,
            error,
        )
        return None
    passes = "pass" if run == 1 else "passes"
    reason = f"stuck on the same error for {run} recovery {passes}: {error}"
    try:
        crew.driver.fail(lease, reason)
    except UploaderError:
        return None
    return reason


def recover_loop(
    crew: Crew,
    *,
    interval: float,
    stop: threading.Event,
    on_report: Callable[[RecoveryReport], None] | None = None,
    on_segment: Callable[[SegmentOutcome], None] | None = None,
    max_reuploads: int = DEFAULT_MAX_REUPLOADS,
    backoff: Backoff | None = None,
    clock: Callable[[], float] = time.monotonic,
    stuck_passes: int = DEFAULT_STUCK_PASSES,
) -> RecoveryReport:
    """Run a pass every ``interval`` seconds until ``stop`` is set; return the last report.

    A pass the manifest's outage cut short (:mod:`uploader.outage`) is logged and run again after
    a bounded, jittered backoff. What the outage kept us from settling is settled first
    (:class:`Owed`: a segment is not left idle until its lease expires); a later pass takes it
    again. Any other error ends the loop.
    """
    guard = OutageGuard("recover", backoff=backoff, clock=clock)
    report = RecoveryReport()
    owed = Owed()
    while not stop.is_set():
        started = clock()
        try:
            owed.settle(crew)
            report = recover(
                crew,
                stop=stop,
                max_reuploads=max_reuploads,
                on_segment=on_segment,
                owed=owed,
                stuck_passes=stuck_passes,
            )
        except Exception as exc:
            if not guard.survive(exc, stop):
                raise
            continue
        guard.ok()
        if on_report is not None:
            on_report(report)
        stop.wait(max(0.0, interval - (clock() - started)))
    return report
