"""The one segment driver: the writer's seal and the recovery job both finish segments through it.

For a leased segment, :meth:`Driver.drive` reads where the segment stands in the manifest, adds
what it learned from the remote in this drive, asks :func:`uploader.plan.next_step` for the next
step, takes it, and asks again, until the segment is ``verified``, ``failed`` with a reason, or
blocked for a named reason. The writer's seal is "record the seal, then drive"; recovery is
"claim, drive, release".

Every outcome the remote gives is written to the manifest here, right after the call that got
it (the transport only moves bytes): a part's ETag, an upload id, a completed object's ETag, a
failed attempt with its error. The one destructive remote call, removing an object that failed
verification, is conditional on that object's ETag, sent only after its intent (``remove_etag``)
was recorded under the current fence and the lease was renewed, and only where the remote proved
that it honours the condition.

The steps that call the remote are in :mod:`uploader.remote_steps` (this class's base); what a
drive learned and the result it returns are in :mod:`uploader.drive_state`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence

from uploader import plan
from uploader.config import VerifyMode
from uploader.digest import Payload, normalize_etag
from uploader.drive_state import (
    DEFAULT_MAX_REUPLOADS,
    VERIFY_MODES,
    Deferred,
    DriveResult,
    Learned,
)
from uploader.errors import (
    LeaseLostError,
    LocalFileError,
    NoSuchUploadError,
    StorageError,
    UnsupportedOperationError,
    UploaderError,
)
from uploader.leases import LeaseKeeper
from uploader.listed_proof import md5_proven
from uploader.manifest.repo import Manifest
from uploader.plan import Act, Position, Step
from uploader.records import CommitRecord, Lease, PutProven, SegmentRecord
from uploader.remote_steps import RemoteSteps
from uploader.states import CommitState, SegmentState
from uploader.storage.base import PutAnswer, Storage
from uploader.storage.rules import matches
from uploader.transport import Counters, Transport, check_local

# Imported from here by the store, recovery and upkeep.
__all__ = ["DEFAULT_MAX_REUPLOADS", "VERIFY_MODES", "DriveResult", "Driver"]

log = logging.getLogger("uploader")

#: Steps that write nothing to the manifest when they succeed (a failure is recorded and
#: raised, which ends the drive): the rows read before them still hold after them.
WROTE_NOTHING = frozenset(
    {Act.PUT, Act.HEAD, Act.LIST_PARTS, Act.CHECK_LOCAL, Act.DEEP_READ, Act.PROBE}
)


class Driver(RemoteSteps):
    """Finishes leased segments; shared by a store's writer and its recovery job."""

    def __init__(
        self,
        manifest: Manifest,
        storage: Storage,
        transport: Transport,
        keeper: LeaseKeeper,
        *,
        node: str,
        verify: str | VerifyMode = VerifyMode.ETAG,
        max_reuploads: int = DEFAULT_MAX_REUPLOADS,
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.manifest = manifest
        self.storage = storage
        self.transport = transport
        self.keeper = keeper
        self.node = node
        self.verify_mode = VerifyMode(verify)
        self.max_reuploads = max_reuploads
        self._conditional_delete: bool | None = None
        self.pause = time.sleep
        #: Progress: called with (key, bytes) each time the remote acknowledged a part or an
        #: object (sent), or parts already there were adopted (reused), as it happens.
        self.on_bytes = None

    # --- the loop ----------------------------------------------------------------------------------

    def drive(
        self,
        lease: Lease,
        *,
        fresh: Mapping[int, Payload | None] | None = None,
        inflight: frozenset[int] = frozenset(),
        counters: Counters | None = None,
        checked: set[int] | None = None,
        release: bool = False,
        max_reuploads: int | None = None,
        deferred: Deferred | None = None,
        known: tuple[SegmentRecord, Sequence[CommitRecord]] | None = None,
        answered: Mapping[int, PutAnswer] | None = None,
    ) -> DriveResult:
        """Take steps until the segment is verified, failed or blocked; return where it stands.

        ``fresh``: commit ids the caller recorded and never sent (with their bytes, if it holds
        them); ``inflight``: commit ids a writer's job is sending now (left alone); ``checked``:
        part numbers whose local bytes the caller read and found equal; ``release``: give the
        lease back with the last transition. Storage and manifest errors are recorded on the
        segment and raised; local bytes gone or changed make the segment ``failed``.
        ``deferred``: a single PUT's verified or failed outcome is kept there instead of
        written (the group commit writes a batch of them in one transaction); the drive then
        returns at once, the segment still ``sealed`` in the manifest. ``known``: the segment
        and its parts as the caller just wrote them under ``lease`` (RETURNING), read instead of
        the manifest for the first step. ``answered``: single PUTs the caller sent already
        for this drive's first step (a group commit's batch, by commit id): their answers are
        taken as that step's PUT would take its own.

        The manifest is read again before each step, except after a step that wrote nothing to
        it (a PUT, a HEAD, a listing, a local check, a read back) while no writer's part is in
        flight: only the holder of a newer fence could have moved the rows then, and every
        write of this drive is guarded by this lease's fence, so it would be refused.
        """
        learned = Learned(
            fresh=dict(fresh or {}),
            checked=set(checked or ()),
            deferred=deferred,
            answered=dict(answered or {}),
        )
        counters = counters if counters is not None else Counters()
        bound = self.max_reuploads if max_reuploads is None else max_reuploads
        seg: SegmentRecord | None = None
        if known is not None:
            seg, commits = known[0], list(known[1])
        for _ in range(64 + 4 * bound):
            if known is None:
                seg, commits = self.manifest.position(lease.segment_id)
            known = None
            assert seg is not None
            if seg.fence != lease.fence or seg.lease_owner != lease.owner:
                if seg.state in (SegmentState.VERIFIED, SegmentState.FAILED) and (
                    seg.fence == lease.fence
                ):
                    return self._result(seg)  # released by our own last transition
                raise LeaseLostError(lease.key, lease.fence, seg.fence)
            position = Position(
                seg=seg,
                commits=commits,
                parts_known=learned.parts_known,
                parts=learned.parts,
                md5_proven=learned.md5_proven,
                object_known=learned.object_known,
                obj=learned.obj,
                local_checked=learned.local_checked,
                local_here=seg.node == self.node,
                deep=self.verify_mode == VerifyMode.DEEP,
                deep_checked=learned.deep_checked,
                read_back_differs=learned.read_back_differs,
                parts_listable=not learned.unlistable,
                fresh=frozenset(learned.fresh),
                inflight=inflight,
                conditional_delete=self._conditional_delete,
                reuploads=self._reuploads(seg, commits, learned),
                max_reuploads=bound,
            )
            step = plan.next_step(position)
            log.debug("segment %r (%s): %s %s", seg.key, seg.state.value, step.act, step.reason)
            if step.act is Act.DONE:
                return self._result(seg)
            if step.act is Act.BLOCK:
                self._record_error(lease, step.reason)
                return self._result(seg, blocked=step.reason)
            if step.act is Act.FAIL:
                return self._fail(lease, seg, step.reason)
            try:
                self._take(step, lease, seg, commits, learned, counters, release)
                if deferred is not None and deferred.proven is not None:
                    return self._result(seg, blocked="verified; written with its batch")
                if step.act in WROTE_NOTHING and not inflight:
                    known = (seg, commits)
            except LocalFileError as exc:
                if exc.retryable:
                    self._record_error(lease, str(exc))
                    raise
                # Invariant 8: the local bytes were the source of truth and they are gone or
                # changed: never verified, never deletable.
                return self._fail(lease, seg, f"local bytes unusable: {exc}")
        assert seg is not None
        reason = "no progress after many steps; left for a later pass"
        self._record_error(lease, reason)
        return self._result(seg, blocked=reason)

    def _result(self, seg: SegmentRecord, blocked: str | None = None) -> DriveResult:
        detail = blocked or seg.reason or seg.last_error or ""
        if seg.state is SegmentState.VERIFIED:
            detail = f"verified, {seg.size} bytes"
        return DriveResult(
            key=seg.key,
            state=seg.state,
            detail=detail,
            blocked=blocked,
            object_etag=seg.object_etag,
        )

    def _reuploads(
        self, seg: SegmentRecord, commits: Sequence[CommitRecord], learned: Learned
    ) -> int:
        """Earlier re-uploads of this segment: counted only when one is being considered."""
        if seg.state is not SegmentState.UPLOADED or not learned.object_known:
            return 0
        if learned.obj is not None and matches(learned.obj, plan.expected(seg, commits)):
            return 0  # the happy path: nothing to count, no read of the audit trail
        return sum(
            1
            for e in self.manifest.events(seg.id)
            if e.commit_id is None and e.from_state == "uploaded" and e.to_state == "sealed"
        )

    # --- the steps -----------------------------------------------------------------------------

    def _take(
        self,
        step: Step,
        lease: Lease,
        seg: SegmentRecord,
        commits: Sequence[CommitRecord],
        learned: Learned,
        counters: Counters,
        release: bool,
    ) -> None:
        act = step.act
        if act is Act.LIST_PARTS:
            assert seg.upload_id is not None
            try:
                listed = self.storage.list_parts(seg.key, seg.upload_id)
            except NoSuchUploadError:
                learned.parts = None
            except UnsupportedOperationError as exc:
                # Nothing the upload holds can be learned: the plan starts a fresh one.
                log.info("segment %r: %s", seg.key, exc)
                learned.parts, learned.unlistable = None, True
            except StorageError as exc:
                self._record_error(lease, f"list_parts: {exc}")
                raise
            else:
                learned.parts = {p.number: p for p in listed}
                # Our local bytes can prove what is listed without a checksum.
                here = seg.node == self.node
                learned.md5_proven = md5_proven(seg, commits, learned.parts) if here else {}
                learned.checked.update(learned.md5_proven)  # read, their CRC32C the recorded one
            learned.parts_known = True
        elif act is Act.HEAD:
            try:
                learned.obj = self.storage.head(seg.key)
            except StorageError as exc:
                if learned.put_ack is not None:
                    # The check could not be made, but what the PUT's response said is a fact:
                    # recorded (uploaded), and recovery verifies it later.
                    commit, etag = learned.put_ack
                    with contextlib.suppress(UploaderError):
                        # (A crc32c-mode put_ack exists only with the part's CRC32C echoed.)
                        self.manifest.put_done(lease, commit, etag, proven=commit.md5 is None)
                self._record_error(lease, f"verify: head: {exc}")
                raise
            learned.object_known = True
        elif act is Act.PROBE:
            self._conditional_delete = self._remote(
                lease, "conditional delete probe", self.storage.conditional_delete
            )
        elif act is Act.RESET_UPLOAD:
            if learned.unlistable and seg.upload_id is not None:
                # The old upload may still exist: let its parts go where the remote allows it
                # (s3rver refuses aborts too; a lifecycle rule then cleans it up).
                with contextlib.suppress(UploaderError):
                    self.storage.abort(seg.key, seg.upload_id)
            self.manifest.reset_commits(lease, step.reason)
            learned.parts_known, learned.parts = False, None
        elif act is Act.ADOPT_PARTS:
            self._adopt_parts(lease, step, learned)
            for c in step.commits:
                counters.reused(c.size)
            self._moved(seg.key, sum(c.size for c in step.commits))
        elif act is Act.UNSEND_PARTS:
            self.manifest.parts_unsent(lease, step.commits, step.reason)
        elif act is Act.START_UPLOAD:
            self.start_upload(lease, seg, commits)
            learned.parts_known, learned.parts = True, {}
        elif act is Act.SEND:
            assert seg.upload_id is not None
            self._send(lease, seg, seg.upload_id, step.commits, learned, counters)
        elif act is Act.PUT:
            self._put(lease, seg, step.commits[0], learned, counters)
        elif act is Act.CHECK_LOCAL:
            check_local(seg, commits, learned.checked)
            learned.local_checked = True
        elif act is Act.COMPLETE:
            self._complete(lease, seg, step.commits, learned)
        elif act is Act.ADOPT_OBJECT:
            assert learned.obj is not None and learned.obj.etag is not None
            self.manifest.object_adopted(
                lease,
                step.commits,
                learned.obj.etag,
                f"object found complete at the key ({learned.obj.size} bytes, etag "
                f"{learned.obj.etag}): a completion whose response was lost",
            )
            for c in step.commits:
                if c.state is CommitState.PENDING:
                    counters.reused(c.size)
                    self._moved(seg.key, c.size)
        elif act is Act.DEEP_READ:
            differs = self._deep_read(lease, seg, commits, learned.obj)
            learned.deep_checked = differs is None
            learned.read_back_differs = differs
        elif act is Act.VERIFY:
            self.manifest.segment_verified(
                lease, self._verified_detail(seg, learned), release=release
            )
            if release:
                self.keeper.drop(seg.id)
        elif act is Act.VERIFY_PUT:
            [commit] = step.commits
            assert learned.obj is not None and learned.obj.etag is not None
            if learned.deferred is not None:
                # Proven exactly as below; the group commit writes it with its batch.
                learned.deferred.proven = PutProven(
                    lease, commit, self._verified_detail(seg, learned), learned.obj.etag
                )
                return
            # The part's ETag is its MD5 (proven: by the object's ETag, or by reading the
            # bytes back where the remote's ETag is another string); the object's is as said.
            # The crc32c mode has no MD5: the object's CRC32C (or its bytes) proved the part.
            self.manifest.put_verified(
                lease,
                commit,
                commit.md5 if commit.md5 is not None else learned.obj.etag,
                self._verified_detail(seg, learned),
                release=release,
                object_etag=learned.obj.etag,
                proven=commit.md5 is None,
            )
            if release:
                self.keeper.drop(seg.id)
        elif act is Act.REUPLOAD:
            self.manifest.reupload(lease, step.reason, remove_etag=step.etag)
            learned.parts_known, learned.parts = False, None
            learned.checked.clear()
            learned.local_checked = False
        elif act is Act.REMOVE:
            assert step.etag is not None
            self._remove(lease, seg, step.etag, learned)
        elif act is Act.FORGET_REMOVE:
            assert step.etag is not None
            self.manifest.object_removed(lease, step.etag)
        else:  # pragma: no cover - every act is handled above
            raise AssertionError(f"unhandled step {act}")

    # --- outcomes ------------------------------------------------------------------------------

    def _verified_detail(self, seg: SegmentRecord, learned: Learned) -> str:
        if self.verify_mode == VerifyMode.DEEP:
            how = "deep: bytes read back"
        elif learned.deep_checked:
            etag = learned.obj.etag if learned.obj is not None else None
            what = "CRC32C" if seg.by_crc32c else "ETag"
            how = f"size, and bytes read back: the remote's {what} did not prove it (etag {etag})"
        elif seg.by_crc32c:
            how = "size and the object's CRC32C"
        else:
            how = "size and ETag"
        return (
            f"verified ({how}; every local byte re-read): {seg.size} bytes, "
            f"{plan.sealed_proof(seg)}"
        )

    def _adopt_parts(self, lease: Lease, step: Step, learned: Learned) -> None:
        """Pending parts the remote lists as held (see ``plan._held``): ``uploaded`` with the
        ETag recorded for them (their MD5), or in the crc32c mode the ETag listed with the part's
        CRC32C and size, which prove it."""
        acks: list[tuple[CommitRecord, str]] = []
        proven: set[int] = set()
        for c in step.commits:
            if c.md5 is not None:
                acks.append((c, c.md5))
                continue
            listed = (learned.parts or {}).get(c.part_number)
            acks.append((c, normalize_etag(listed.etag) or "" if listed is not None else ""))
            proven.add(c.id)
        self.manifest.parts_uploaded(lease, acks, step.reason, proven=frozenset(proven))

    def fail(self, lease: Lease, reason: str) -> DriveResult:
        """Declare the leased segment ``failed`` with ``reason`` (recovery: stuck too long)."""
        return self._fail(lease, self.manifest.segment_by_id(lease.segment_id), reason)

    def _fail(self, lease: Lease, seg: SegmentRecord, reason: str) -> DriveResult:
        try:
            self.manifest.fail_segment(lease, reason)
        except UploaderError as exc:  # lost the lease meanwhile: the new holder decides
            log.warning("could not mark %r failed: %s", seg.key, exc)
            raise
        if seg.upload_id is not None:
            # Our own unfinished upload: nothing will complete it now (the sweep would too).
            with contextlib.suppress(UploaderError):
                self.storage.abort(seg.key, seg.upload_id)
        log.error("segment %r failed: %s", seg.key, reason)
        failed = self.manifest.segment_by_id(seg.id)
        return self._result(failed)
