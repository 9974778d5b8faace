"""The driver's remote calls: each step that talks to the remote, and what it answered, recorded.

:class:`RemoteSteps` is the half of :class:`uploader.driver.Driver` that calls the storage: start
an upload, send recorded parts, PUT a small segment, complete, read back, remove an object by its
ETag, check an object (``uploader verify``, the scrub and the deletion gate). Every outcome the
remote gives is written to the manifest here, right after the call that got it; a storage error is
recorded on the segment and raised. What to do next is never decided here (:mod:`uploader.plan`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import TypeVar

from uploader import objectmeta, plan
from uploader.acks import Ack, AckBook
from uploader.digest import Payload, crc32c_b64, normalize_etag
from uploader.drive_state import Learned
from uploader.errors import (
    NoSuchUploadError,
    ObjectChangedError,
    ObjectExistsError,
    PreconditionFailedError,
    StorageError,
    UploaderError,
)
from uploader.leases import LeaseKeeper
from uploader.manifest.guard import check_acknowledged
from uploader.manifest.repo import Manifest
from uploader.readback import first_differing
from uploader.records import CommitRecord, Lease, PutFailed, SegmentRecord
from uploader.storage.base import ObjectInfo, PartRef, Storage, prepare_complete
from uploader.transport import Counters, Transport, recorded_payload, wait_all

log = logging.getLogger("uploader")

T = TypeVar("T")

#: An object replaced while a check read it back is judged again after each of these pauses
#: (seconds) before the check gives up (ObjectChangedError): something keeps rewriting the key,
#: and a look at once would most likely land in the middle of the next rewrite again.
CHANGED_PAUSES = (0.2, 1.0)


class RemoteSteps:
    """The remote calls of a :class:`~uploader.driver.Driver` (its base: one object, two files)."""

    manifest: Manifest
    storage: Storage
    transport: Transport
    keeper: LeaseKeeper
    on_bytes: Callable[[str, int], None] | None
    #: How a check waits before it looks again at a key rewritten under it (tests record it).
    pause: Callable[[float], None]

    def _moved(self, key: str, nbytes: int) -> None:
        hook = self.on_bytes
        if hook is None or not nbytes:
            return
        try:
            hook(key, nbytes)
        except Exception:  # progress reporting must never change what the upload does
            log.exception("progress hook failed for %s", key)

    def _remote(self, lease: Lease, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except StorageError as exc:
            self._record_error(lease, f"{what}: {exc}")
            raise

    def start_upload(
        self, lease: Lease, seg: SegmentRecord, commits: Sequence[CommitRecord] = ()
    ) -> SegmentRecord:
        """Start the segment's multipart upload and record its id (before any part is sent);
        returns the segment's row as written. The object's metadata says what is known now (all
        of the seal's checksums only if the seal is recorded: see :mod:`uploader.objectmeta`)."""
        metadata = objectmeta.object_metadata(seg, commits)
        upload_id = self._remote(
            lease, "start_upload", lambda: self.storage.start_upload(seg.key, metadata=metadata)
        )
        # What the Complete will need to know about the remote is learned while parts are sent.
        prepare_complete(self.storage)
        # Started before it is recorded: a crash in between leaves an unreferenced upload, which
        # the sweep aborts (invariant 9); recording first would need an id we do not have yet.
        return self.manifest.set_upload(lease, upload_id, "multipart")

    def _send(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        commits: Sequence[CommitRecord],
        learned: Learned,
        counters: Counters,
    ) -> None:
        """Send recorded parts in parallel; what the remote acknowledged is written in chunks
        while parts are submitted and the rest once they are all done (failed or not), never one
        transaction per part (:mod:`uploader.acks`). A crash before a write leaves acknowledged
        parts ``pending``: the next drive lists the upload and adopts them (a re-check, nothing
        lost, nothing sent twice where the listing proves them)."""
        futures: list[Future[None]] = []
        book = AckBook(lambda acks: self._record_acks(lease, seg, acks, learned))
        try:
            for c in commits:
                payload = learned.fresh.pop(c.id, None)
                book.write_due()  # holding no slot: about to wait for one
                futures.append(
                    self.transport.in_slot(
                        self.send_acked, lease, seg, upload_id, c, payload, counters, book
                    )
                )
        finally:
            wait(futures)
            try:
                book.write_rest()
            finally:
                try:
                    wait_all(futures)
                except NoSuchUploadError:
                    learned.parts_known, learned.parts = True, None
                    raise
        if learned.parts is not None:
            for c in commits:
                learned.parts[c.part_number] = PartRef(
                    c.part_number, c.md5 or "", c.size, crc32c=c.crc32c
                )

    def send_acked(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        commit: CommitRecord,
        payload: Payload | None,
        counters: Counters,
        book: AckBook,
    ) -> None:
        """Send one recorded part; keep what the remote acknowledged in ``book`` (checked now:
        an ETag that is not the part's MD5 fails this part alone), the failure recorded. The
        submitting thread writes the book (:meth:`record_acks`), never while a slot is held."""
        ack = self._send_one(lease, seg, upload_id, commit, payload)
        payload = None  # the part's bytes go now, before any manifest round trip
        check_acknowledged(lease, commit, ack.etag, proven=ack.proven)
        book.add(ack)
        counters.sent(commit.size)
        self._moved(seg.key, commit.size)

    def _send_one(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        commit: CommitRecord,
        payload: Payload | None,
    ) -> Ack:
        """Send one recorded part: what the remote acknowledged, or its failure recorded on the
        part and raised."""
        try:
            ref = self.transport.send_part(seg, upload_id, commit, payload)
        except StorageError as exc:
            with contextlib.suppress(UploaderError):  # a lost lease: the new holder retries
                self.manifest.commit_attempt_failed(lease, commit, str(exc))
            raise
        return Ack(commit, normalize_etag(ref.etag) or "", ref.proven_by_checksum)

    def _record_acks(
        self, lease: Lease, seg: SegmentRecord, acks: Sequence[Ack], learned: Learned
    ) -> None:
        self.record_acks(lease, acks)
        learned.checked.update(a.commit.part_number for a in acks)

    def record_acks(self, lease: Lease, acks: Sequence[Ack], upload_id: str | None = None) -> None:
        """Write what the remote acknowledged for sent parts: ``uploaded``, in one transaction
        (refused if the segment's upload is no longer ``upload_id``, the one they went to)."""
        if not acks:
            return
        self.manifest.parts_uploaded(
            lease,
            [(a.commit, a.etag) for a in acks],
            proven=frozenset(a.commit.id for a in acks if a.proven),
            upload_id=upload_id,
        )

    def _put(
        self,
        lease: Lease,
        seg: SegmentRecord,
        commit: CommitRecord,
        learned: Learned,
        counters: Counters,
    ) -> None:
        payload = learned.fresh.pop(commit.id, None)
        answer = learned.answered.pop(commit.id, None)
        try:
            if answer is not None:
                # Sent already, with its batch (uploader.group: the same plan's PUT, the same
                # metadata): its answer is taken here exactly as this PUT's own would be.
                if answer.error is not None:
                    raise answer.error
                assert answer.info is not None
                info = answer.info
            else:
                metadata, record_first = objectmeta.put_metadata(seg, commit)
                if record_first:
                    self._write_record(lease, seg, [commit])  # did not fit S3's 2 KB
                with self.transport.slots:
                    if payload is None:
                        payload = recorded_payload(seg.path, commit)
                    info = self.storage.put(seg.key, payload, metadata=metadata)
        except ObjectExistsError:
            self._look(lease, seg, learned)  # an object is there already: learn which
            return
        except StorageError as exc:
            if learned.deferred is not None:  # written with the group commit's batch
                learned.deferred.failed = PutFailed(lease, commit, str(exc))
                raise
            with contextlib.suppress(UploaderError):
                self.manifest.commit_attempt_failed(lease, commit, str(exc))
            raise
        del payload
        if commit.md5 is not None or info.checksum == crc32c_b64(commit.crc32c):
            # What the response proves (a crc32c-mode part: only its CRC32C echoed).
            learned.put_ack = (commit, normalize_etag(info.etag) or commit.md5 or "")
        learned.checked.add(commit.part_number)
        counters.sent(commit.size)
        self._moved(seg.key, commit.size)
        learned.object_changed()
        if info.proven:
            # The remote honoured the condition (nothing was replaced) and echoed our bytes'
            # CRC32C (or their MD5 as the ETag): its answer is what a HEAD would say, so none
            # is sent.
            learned.obj, learned.object_known = info, True
        # Otherwise the object is checked with a HEAD of its own: a response that proves less
        # is not proof that the object is at the key now.

    def _complete(
        self, lease: Lease, seg: SegmentRecord, commits: Sequence[CommitRecord], learned: Learned
    ) -> None:
        assert seg.upload_id is not None
        parts = [
            PartRef(number=c.part_number, etag=c.etag or "", size=c.size, crc32c=c.crc32c)
            for c in commits
        ]
        # The segment's full record, for a rebuild of a lost manifest, before the object exists:
        # named by the ETag the object will have, so it describes exactly those bytes.
        self._write_record(lease, seg, commits)
        try:
            info = self.storage.complete(seg.key, seg.upload_id, parts, plan.expected(seg, commits))
        except NoSuchUploadError:
            learned.parts_known, learned.parts = True, None
            learned.object_changed()
            return
        except ObjectExistsError:
            self._look(lease, seg, learned)  # an object is there already: learn which
            return
        except StorageError as exc:
            self._record_error(lease, f"complete: {exc}")
            raise
        etag = normalize_etag(info.etag)
        self.manifest.segment_uploaded(lease, etag)
        # The backends learn the object's size and ETag after completing (S3: a HEAD).
        learned.obj, learned.object_known = info, True

    def _write_record(
        self, lease: Lease, seg: SegmentRecord, commits: Sequence[CommitRecord]
    ) -> None:
        # Named by the ETag the object will have; in the crc32c mode (no MD5s, no ETag known
        # beforehand) by the mode, and tied to the object by its CRC32C instead.
        name = objectmeta.record_name(seg.key, seg.expected_etag or objectmeta.CRC32C_RECORD)
        body = objectmeta.record_json(seg, commits)
        self._remote(lease, "record sidecar", lambda: self.storage.write_hidden(name, body))

    def _look(self, lease: Lease, seg: SegmentRecord, learned: Learned) -> None:
        learned.object_changed()
        learned.obj = self._remote(lease, "head", lambda: self.storage.head(seg.key))
        learned.object_known = True

    def _differing_part(
        self, seg: SegmentRecord, commits: Sequence[CommitRecord], seen: ObjectInfo | None
    ) -> CommitRecord | None:
        """Read the object back part by part: the first part whose bytes are not the recorded
        ones (MD5 and CRC32C; CRC32C only in the crc32c mode), or None. ``seen``: the object
        the reads are about (ObjectChangedError if another is at the key after them)."""
        i = first_differing(
            self.storage, seg.key, [(c.start, c.end, c.md5, c.crc32c) for c in commits], seen
        )
        return None if i is None else commits[i]

    def _deep_read(
        self,
        lease: Lease,
        seg: SegmentRecord,
        commits: Sequence[CommitRecord],
        seen: ObjectInfo | None,
    ) -> str | None:
        """Read the object back: None if every part's bytes are as recorded, else what differs
        (the plan decides what that means for the object ``seen``, the one it judged; another
        at the key after the reads fails this attempt, ObjectChangedError)."""
        try:
            if seen is None or seen.proven:
                # A write's own answer (it may lack what a HEAD reports, such as the ETag): the
                # object the reads are about is the one a HEAD sees now.
                seen = self.storage.head(seg.key)
                if seen is None:
                    raise ObjectChangedError(f"object {seg.key!r} vanished before it was read back")
            c = self._differing_part(seg, commits, seen)
        except StorageError as exc:
            self._record_error(lease, f"deep read: {exc}")
            raise
        if c is None:
            return None
        return f"bytes [{c.start}, {c.end}) (part {c.part_number}) differ from the local bytes"

    def _remove(self, lease: Lease, seg: SegmentRecord, etag: str, learned: Learned) -> None:
        # The lease is proven current right before the call (a guarded write), on top of the
        # intent recorded under this fence; the condition on the ETag makes a late or stale
        # copy of this request harmless to any other object at the key.
        self.manifest.renew(lease, self.keeper.lease_seconds)
        # A failed precondition: another object is at the key now, not the one the intent names.
        with contextlib.suppress(PreconditionFailedError):
            self._remote(lease, "delete", lambda: self.storage.delete_if_match(seg.key, etag))
        self.manifest.object_removed(lease, etag)
        learned.object_changed()

    def check_object(self, seg: SegmentRecord, *, deep: bool) -> str | None:
        """None if the object at the key matches what the seal recorded, else what differs.

        One HEAD; the parts are read from the manifest (and the object read back) only when
        ``deep`` or when the remote's ETag is not the expected one (none, a plain MD5, an SSE-KMS
        string). Changes nothing: ``uploader verify``, the scrub and the deletion gate use it.
        An object replaced while it was read back is judged again as it is now, after a pause
        (:data:`CHANGED_PAUSES`, then ObjectChangedError): bytes read from two objects say
        nothing of either.
        """
        for pause in CHANGED_PAUSES:
            try:
                return self._check_object(seg, deep=deep)
            except ObjectChangedError as exc:
                log.warning("segment %r: %s (looked at again in %.1f s)", seg.key, exc, pause)
            self.pause(pause)
        return self._check_object(seg, deep=deep)

    def _check_object(self, seg: SegmentRecord, *, deep: bool) -> str | None:
        if seg.size is None or (seg.expected_etag is None and not seg.by_crc32c):
            return f"segment {seg.key!r} is {seg.state.value}: nothing sealed to compare with"
        info = self.storage.head(seg.key)
        if info is None:
            return f"no object at {seg.key!r}"
        if info.size != seg.size:
            return f"object {seg.key!r} has {info.size} bytes, expected {seg.size}"
        etag = normalize_etag(info.etag)
        if info.checksum is not None:
            commits = self.manifest.commits(seg.id)
            if not plan.checksum_ok(info, seg, commits):
                return (
                    f"object {seg.key!r} has CRC32C {info.checksum}, not the one of the "
                    "recorded parts"
                )
        if not deep and etag is not None and etag == seg.expected_etag:
            return None
        if not deep and seg.by_crc32c and info.checksum is not None:
            return None  # the crc32c mode's proof: the object's CRC32C, compared above
        # The crc32c mode and no checksum reported: never accepted as is; read back below.
        # No ETag, or one that is not the part MD5s' (s3rver, SSE-KMS): only the bytes can
        # tell, and a correct object is never called drifted for its ETag alone.
        c = self._differing_part(seg, self.manifest.commits(seg.id), info)
        if c is not None:
            return f"object {seg.key!r} bytes [{c.start}, {c.end}) differ from part {c.part_number}"
        return None

    def _record_error(self, lease: Lease, error: str) -> None:
        with contextlib.suppress(UploaderError):  # a lost lease: the new holder records
            self.manifest.record_error(lease, error)
