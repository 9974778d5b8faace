"""The recovery job: claim unfinished segments, resume them from what the remote holds, prove them.

Words:

* **claim**: take a segment's lease with a fresh fence token (``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL), so several workers on several hosts share the work and a worker whose lease expired
  can no longer change a row.
* **resume**: bring a segment one step nearer to ``verified`` from wherever a crash left it:
  parts the remote already holds with the recorded MD5 are *reused* (recorded ``uploaded`` without
  being sent again); missing or mismatched ones are *re-sent* from the local file after its bytes
  were checked against the recorded digests.
* **sweep**: abort multipart uploads (and staged parts) under the remote root that no unfinished
  manifest row references.

Every crash point has an answer here:

======================================  ==========================================================
left behind                             what resume does
======================================  ==========================================================
pending part that actually arrived      listed with the recorded MD5: reused
pending part that never arrived         re-sent from the local file (bytes checked first)
upload id the remote no longer knows    object at the key matching? recorded as uploaded; else a
                                        fresh upload, every part re-sent
completed but completion not recorded   HEAD the key, compare size and ETag: recorded as uploaded
completed object fails verification     deleted, ``uploaded -> sealed``, re-sent (bounded), then
                                        ``failed``
local bytes gone or changed             ``failed`` with the reason (never verified)
open segment (writer gone)              its pending whole parts are uploaded; it stays open: only
                                        its writer seals it
======================================  ==========================================================
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from uploader.digest import normalize_etag
from uploader.engine import Counters
from uploader.errors import (
    LeaseLostError,
    LocalFileError,
    ManifestError,
    NoSuchUploadError,
    ObjectExistsError,
    StaleStateError,
    StorageError,
    UploaderError,
    VerificationError,
)
from uploader.records import CommitRecord, Lease, SegmentRecord
from uploader.states import CommitState, SegmentState
from uploader.storage.base import PartRef
from uploader.storage.rules import matches

if TYPE_CHECKING:
    from uploader.store import Store

log = logging.getLogger("uploader.recovery")

#: How many times a completed object that failed verification is uploaded again before the
#: segment is declared ``failed``.
DEFAULT_MAX_REUPLOADS = 3


@dataclass(frozen=True, slots=True)
class SegmentOutcome:
    """What one claim of one segment did."""

    key: str
    before: str  # state when claimed
    after: str  # state when released
    bytes_sent: int = 0
    bytes_reused: int = 0
    detail: str = ""
    lost: bool = False  # another worker took the segment over: this pass decided nothing


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What a recovery pass did. ``ok`` is what the CLI's exit code says."""

    outcomes: tuple[SegmentOutcome, ...] = ()
    bytes_sent: int = 0
    bytes_reused: int = 0
    parts_sent: int = 0
    parts_reused: int = 0

    @property
    def resumed(self) -> int:
        """Segments this pass claimed and worked on."""
        return len(self.outcomes)

    @property
    def verified(self) -> tuple[str, ...]:
        return tuple(
            o.key for o in self.outcomes if o.after == SegmentState.VERIFIED.value and not o.lost
        )

    @property
    def failed(self) -> tuple[tuple[str, str], ...]:
        """(key, reason) of segments this pass declared failed."""
        return tuple(
            (o.key, o.detail)
            for o in self.outcomes
            if o.after == SegmentState.FAILED.value and not o.lost
        )

    @property
    def unfinished(self) -> tuple[tuple[str, str], ...]:
        """(key, why) of sealed segments left unverified (retryable errors); a later pass retries."""
        return tuple(
            (o.key, o.detail)
            for o in self.outcomes
            if o.after in (SegmentState.SEALED.value, SegmentState.UPLOADED.value) and not o.lost
        )

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unfinished

    def as_dict(self) -> dict[str, object]:
        return {
            "resumed": self.resumed,
            "verified": list(self.verified),
            "failed": [{"key": k, "reason": r} for k, r in self.failed],
            "unfinished": [{"key": k, "error": r} for k, r in self.unfinished],
            "bytes_sent": self.bytes_sent,
            "bytes_reused": self.bytes_reused,
            "parts_sent": self.parts_sent,
            "parts_reused": self.parts_reused,
            "segments": [
                {
                    "key": o.key,
                    "before": o.before,
                    "after": o.after,
                    "bytes_sent": o.bytes_sent,
                    "bytes_reused": o.bytes_reused,
                    "detail": o.detail,
                    "lost": o.lost,
                }
                for o in self.outcomes
            ],
        }


@dataclass
class _Totals:
    outcomes: list[SegmentOutcome] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)


def recover(
    store: Store,
    *,
    limit: int | None = None,
    max_reuploads: int = DEFAULT_MAX_REUPLOADS,
    stop: threading.Event | None = None,
    on_segment: Callable[[SegmentOutcome], None] | None = None,
) -> RecoveryReport:
    """One pass over the unfinished segments this worker can act on.

    Claims them one at a time in id order (others are claimed by other workers meanwhile), resumes
    each, releases it. ``limit`` bounds the number of claims; ``stop`` ends the pass after the
    segment in hand (graceful shutdown).
    """
    totals = _Totals()
    after_id = 0
    batch = max(1, store.concurrency)
    while limit is None or len(totals.outcomes) < limit:
        if stop is not None and stop.is_set():
            break
        want = batch if limit is None else min(batch, limit - len(totals.outcomes))
        # One transaction claims a batch; the batch is resumed in parallel (its parts share the
        # store's slots, so memory stays bounded), then every lease is released.
        claimed = store.manifest.claim(
            store.worker, node=store.node, ttl=store.lease_seconds, after_id=after_id, limit=want
        )
        if not claimed:
            break
        after_id = claimed[-1][1].id
        for lease, _seg in claimed:
            store._hold_lease(lease)

        def work(item: tuple[Lease, SegmentRecord]) -> SegmentOutcome:
            lease, seg = item
            try:
                return _resume(store, lease, seg, max_reuploads, totals.counters)
            finally:
                store._forget_lease(seg.id)

        if len(claimed) == 1:
            outcomes = [work(claimed[0])]
        else:
            with ThreadPoolExecutor(len(claimed), thread_name_prefix="uploader-recover") as ex:
                outcomes = list(ex.map(work, claimed))
        for outcome in outcomes:
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


def _resume(
    store: Store, lease: Lease, seg: SegmentRecord, max_reuploads: int, totals: Counters
) -> SegmentOutcome:
    counters = Counters()
    before = seg.state.value
    detail = ""
    lost = False
    try:
        _drive(store, lease, seg, max_reuploads, counters)
    except LocalFileError as exc:
        # Invariant 8: the local bytes were the source of truth and they are gone or changed.
        detail = f"local bytes unusable: {exc}"
        _fail(store, lease, detail)
    except (LeaseLostError, StaleStateError) as exc:
        detail = f"another worker took it over: {exc}"
        lost = True
        log.warning("%s", detail)
    except (StorageError, VerificationError, ManifestError) as exc:
        detail = str(exc)
        log.warning("segment %r stays unfinished: %s", seg.key, exc)
        with contextlib.suppress(UploaderError):  # lease lost meanwhile: the new holder records
            store.manifest.record_error(lease, detail)
    after = store.manifest.segment_by_id(seg.id)
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
    with totals.lock:
        totals.bytes_sent += counters.bytes_sent
        totals.parts_sent += counters.parts_sent
        totals.bytes_reused += counters.bytes_reused
        totals.parts_reused += counters.parts_reused
    return SegmentOutcome(
        key=seg.key,
        before=before,
        after=after.state.value,
        bytes_sent=counters.bytes_sent,
        bytes_reused=counters.bytes_reused,
        detail=detail,
        lost=lost,
    )


def _fail(store: Store, lease: Lease, reason: str) -> None:
    try:
        store.manifest.fail_segment(lease, reason)
    except UploaderError as exc:  # lost the lease meanwhile: the new holder decides
        log.warning("could not mark %r failed: %s", lease.key, exc)


def _drive(
    store: Store, lease: Lease, seg: SegmentRecord, max_reuploads: int, counters: Counters
) -> None:
    """Move one claimed segment as far as it can go."""
    manifest = store.manifest
    for _ in range(max_reuploads + 2):
        seg = manifest.segment_by_id(seg.id)
        if seg.state is SegmentState.OPEN:
            _upload_pending(store, lease, seg, counters)
            return
        if seg.state is SegmentState.SEALED:
            if seg.upload_mode == "put":
                _resume_put(store, lease, seg, counters)
            else:
                _upload_pending(store, lease, seg, counters)
                seg = manifest.segment_by_id(seg.id)
                if seg.state is SegmentState.SEALED:  # not adopted as already complete
                    store.shipper.complete(lease, seg, manifest.commits(seg.id))
            continue
        if seg.state is SegmentState.UPLOADED:
            commits = manifest.commits(seg.id)
            try:
                store.shipper.verify(lease, seg, commits)
            except VerificationError as exc:
                if _reuploads(store, seg) >= max_reuploads:
                    _fail(
                        store,
                        lease,
                        f"the object failed verification {max_reuploads + 1} times: {exc}",
                    )
                    return
                # The object is provably not ours (wrong size or checksum): it must go before a
                # conditional complete can publish the right bytes.
                store.storage.delete(seg.key)
                manifest.reupload(lease, f"verification failed, uploading again: {exc}")
            continue
        return  # verified or failed: nothing to do


def _reuploads(store: Store, seg: SegmentRecord) -> int:
    return sum(
        1
        for e in store.manifest.events(seg.id)
        if e.commit_id is None and e.from_state == "uploaded" and e.to_state == "sealed"
    )


def _resume_put(store: Store, lease: Lease, seg: SegmentRecord, counters: Counters) -> None:
    """A single-PUT segment: the object may already be there (response lost) or not."""
    [commit] = store.manifest.commits(seg.id)
    info = store.storage.head(seg.key)
    if info is not None:
        if matches(info, store.shipper.expected(seg)):
            if commit.state is CommitState.PENDING:
                store.manifest.commit_uploaded(lease, commit, commit.md5)
            store.manifest.segment_uploaded(lease, info.etag)
            counters.reused(commit.size)
            return
        raise ObjectExistsError(
            f"segment {seg.key!r}: another object ({info.size} bytes, etag {info.etag}) is at the "
            "key; it was not written by this segment. Remove it or rename the segment"
        )
    if commit.state is CommitState.UPLOADED:
        # Recorded uploaded but not at the key (deleted behind our back): send it again.
        store.manifest.transition_commit(
            lease, commit.id, CommitState.UPLOADED, CommitState.PENDING, reason="object missing"
        )
        commit = store.manifest.commits(seg.id)[0]
    store.shipper.put(lease, seg, commit)
    counters.sent(commit.size)


def _upload_pending(store: Store, lease: Lease, seg: SegmentRecord, counters: Counters) -> None:
    """Reuse the parts the remote holds, re-send the others (after checking the local bytes)."""
    manifest = store.manifest
    commits = manifest.commits(seg.id)
    if not any(c.state is CommitState.PENDING for c in commits) and seg.state is SegmentState.OPEN:
        return
    listed: dict[int, PartRef] = {}
    if seg.upload_id is not None:
        try:
            listed = {p.number: p for p in store.storage.list_parts(seg.key, seg.upload_id)}
        except NoSuchUploadError:
            if seg.state is SegmentState.SEALED and _adopt_completed(store, lease, seg, commits):
                counters.reused(sum(c.size for c in commits))
                return
            # The upload is gone (swept, expired by a lifecycle rule): start over under a new one.
            manifest.reset_commits(lease, f"upload {seg.upload_id} is unknown to the remote")
            seg = manifest.segment_by_id(seg.id)
            commits = manifest.commits(seg.id)
    for c in commits:
        part = listed.get(c.part_number)
        held = part is not None and normalize_etag(part.etag) == c.md5
        if c.state is CommitState.PENDING and held:
            manifest.commit_uploaded(lease, c, c.md5)  # arrived before the crash: reuse it
            counters.reused(c.size)
        elif c.state is CommitState.UPLOADED and not held and seg.upload_id is not None:
            manifest.transition_commit(
                lease,
                c.id,
                CommitState.UPLOADED,
                CommitState.PENDING,
                reason=f"part {c.part_number} is not held by the remote with the recorded MD5",
            )
    pending = [c for c in manifest.commits(seg.id) if c.state is CommitState.PENDING]
    if not pending:
        return
    upload_id = store.shipper.ensure_upload(lease, seg)
    seg = manifest.segment_by_id(seg.id)
    sent = store.shipper.send_parts(lease, seg, upload_id, pending)
    with counters.lock:
        counters.bytes_sent += sent.bytes_sent
        counters.parts_sent += sent.parts_sent


def _adopt_completed(
    store: Store, lease: Lease, seg: SegmentRecord, commits: Sequence[CommitRecord]
) -> bool:
    """The upload completed but the completion was never recorded: adopt the object if it matches."""
    info = store.storage.head(seg.key)
    if info is None or not matches(info, store.shipper.expected(seg)):
        return False
    for c in commits:
        if c.state is CommitState.PENDING:
            store.manifest.commit_uploaded(lease, c, c.md5)
    store.manifest.segment_uploaded(lease, info.etag)
    return True


# --- sweep ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SweepReport:
    """Unfinished uploads under the root that no live manifest row references."""

    aborted: tuple[tuple[str, str], ...] = ()  # (key, upload id)
    kept_live: int = 0  # referenced by an unfinished segment
    kept_young: int = 0  # orphaned but younger than ``older_than`` (may be about to be recorded)
    dry_run: bool = False
    tmp_removed: tuple[str, ...] = ()  # leftovers of interrupted assemblies (staged backends)

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "aborted" if not self.dry_run else "would_abort": [
                {"key": k, "upload_id": u} for k, u in self.aborted
            ],
            "kept_live": self.kept_live,
            "kept_young": self.kept_young,
            "tmp_removed": list(self.tmp_removed),
        }


#: An upload is started before its id is recorded (the id comes from the remote): the sweep leaves
#: orphans younger than this alone so it cannot abort an upload whose id is about to be recorded.
DEFAULT_SWEEP_AGE = 3600.0


def sweep(
    store: Store, *, dry_run: bool = False, older_than: float = DEFAULT_SWEEP_AGE, prefix: str = ""
) -> SweepReport:
    """Abort orphaned multipart uploads (and their staged parts) under the remote root."""
    live = store.manifest.live_upload_ids()
    cutoff = store.manifest.clock() - timedelta(seconds=older_than)
    aborted: list[tuple[str, str]] = []
    kept_live = kept_young = 0
    for up in store.storage.list_uploads(prefix):
        if up.upload_id in live:
            kept_live += 1
            continue
        if up.initiated is not None and up.initiated > cutoff:
            kept_young += 1
            continue
        # Read the manifest again just before aborting: an upload recorded since the listing is
        # live, not an orphan.
        if up.upload_id in store.manifest.live_upload_ids():
            kept_live += 1
            continue
        if not dry_run:
            store.storage.abort(up.key, up.upload_id)
        aborted.append((up.key, up.upload_id))
    # Staged backends: temporary files of a complete/put interrupted before publishing.
    clean_tmp = getattr(store.storage, "clean_tmp", None)
    tmp_removed: list[str] = clean_tmp(older_than, dry_run=dry_run) if clean_tmp else []
    return SweepReport(
        aborted=tuple(aborted),
        kept_live=kept_live,
        kept_young=kept_young,
        dry_run=dry_run,
        tmp_removed=tuple(tmp_removed),
    )


def recover_loop(
    store: Store,
    *,
    interval: float,
    stop: threading.Event,
    on_report: Callable[[RecoveryReport], None] | None = None,
    max_reuploads: int = DEFAULT_MAX_REUPLOADS,
) -> RecoveryReport:
    """Run passes every ``interval`` seconds until ``stop`` is set; return the last report."""
    report = RecoveryReport()
    while not stop.is_set():
        started = time.monotonic()
        report = recover(store, stop=stop, max_reuploads=max_reuploads)
        if on_report is not None:
            on_report(report)
        stop.wait(max(0.0, interval - (time.monotonic() - started)))
    return report
