"""Group commit: ``Store.ship_many(items)`` ships many whole files as segments, a batch at a time.

Per batch of new segments no bigger than a part (at most :data:`BATCH` of them, and at most
half of ``concurrency x part_size`` bytes, one part at least, held in memory; the next batch is
read and registered while this one's PUTs are out, and this one's outcomes are written while the
next one's PUTs are out, needing none of its bytes: at most two batches' bytes are held, and the
remote is not left waiting while a batch's outcomes are written):

1. each file is read once and its checksums taken (off the caller's thread);
2. ONE transaction registers, leases and seals them all, each part ``pending``: the same rows,
   states and audit events as ``store.segment(key, path).seal()`` (intent before action);
3. the PUTs go out together, up to the store's concurrency at a time
   (:func:`~uploader.storage.base.put_many`: on S3 as coroutines on one event loop, no thread
   per request); each is the first step its drive would take, and the one driver takes its
   answer as that step's own and proves the segment exactly as for a single seal (the remote's
   answer or a HEAD, the local bytes), keeping the outcome
   (:class:`~uploader.drive_state.Deferred`) instead of writing it. (The batch's bytes are
   held already, within the budget above, so its requests take no transport slot: while other
   segments' parts are sent, and the previous batch's drives send the HEADs or read-backs their
   answers call for, up to three times ``concurrency`` requests may be in flight.)
4. ONE transaction writes every outcome: ``verified`` (the lease given back) or the failed
   attempt with its error, each guarded by its own lease.

A crash anywhere leaves sealed segments whose parts are ``pending``: the recovery job finishes
them (the object found at the key is checked and adopted, or the PUT is sent again). A key
already in the manifest (a segment another process holds, one sealed before, a bigger file)
takes the one-at-a-time path, ``store.segment(key, path).seal()``, which refuses what it must
(``SegmentBusyError`` for a segment another live process holds: it is never taken from it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from uploader import objectmeta
from uploader.config import VerifyMode
from uploader.digest import Payload, read_range, stat_file
from uploader.drive_state import DriveResult
from uploader.errors import UploaderError, UsageError
from uploader.futures import CommitResult, UploadFuture
from uploader.group_outcomes import (
    Item,
    drive_item,
    drop_frames,
    fail,
    finish_batch,
    interrupted,
    let_go,
    resolve,
)
from uploader.keys import validate_key
from uploader.records import SmallSeal
from uploader.storage.base import PutAnswer, PutItem, put_many

if TYPE_CHECKING:
    from uploader.manifest.batches import Sealed
    from uploader.store import Store

log = logging.getLogger("uploader")

#: Segments per intents transaction (and per outcomes transaction).
BATCH = 256


def submit(
    store: Store, items: Iterable[tuple[str, str | os.PathLike[str]]]
) -> list[UploadFuture[CommitResult]]:
    """Check the keys on the caller's thread, then ship on the store's job pool; one future per
    item, in order (see :meth:`uploader.store.Store.ship_many`)."""
    store._check_open()
    entries: list[Item] = []
    seen: set[str] = set()
    for key, path in items:
        validate_key(key)
        store.storage.check_key(key)
        if key in seen:
            raise UsageError(f"segment key {key!r} is given twice (nothing was recorded)")
        seen.add(key)
        apath = os.path.abspath(os.fspath(path))
        entries.append(Item(key, apath, UploadFuture(f"seal of segment {key!r}")))
    futures = [e.fut for e in entries]
    if entries:
        store._submit_group(lambda: _run(store, entries), futures)
    return futures


def _run(store: Store, entries: list[Item]) -> None:
    # Batch k+1's files are read and its intents written while batch k's PUTs are out (on the
    # sender thread), and batch k's outcomes are written (on the settler thread) while batch
    # k+1's PUTs are out: the manifest's work and the network's overlap, and the remote is not
    # left idle between batches. At most two batches' bytes are held, each within half the
    # budget (one part at least): a batch's outcomes need none of them.
    sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uploader-group")
    settler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uploader-settle")
    sending: Future[Future[None]] | None = None
    settling: list[Future[None]] = []
    failed: BaseException | None = None
    try:
        batch: list[Item] = []
        held = 0
        budget = max(store.part_size, store.concurrency * store.part_size // 2)
        # One mode for the group's new segments, as segment() would record for each (the
        # remote's answer is cached per storage instance).
        checksum = store.new_segment_checksum()
        for e in entries:
            if not e.fut.set_running_or_notify_cancel():
                continue  # cancelled (interrupted) before it started: nothing recorded
            if not _prepare(store, e):
                continue
            if e.size > store.part_size:
                _one_at_a_time(store, e)
                continue
            if batch and (len(batch) >= BATCH or held + e.size > budget):
                sending = _next_batch(store, sender, settler, sending, batch, settling)
                batch, held = [], 0
            try:
                e.payload = read_range(e.path, 0, e.size, md5=checksum == "md5")
            except UploaderError as exc:  # gone or shrunk since its stat: nothing recorded
                fail(e, exc)
                continue
            batch.append(e)
            held += e.size
        if batch:
            sending = _next_batch(store, sender, settler, sending, batch, settling)
        if sending is not None:
            settling.append(sending.result())
        _settled(settling)
    except BaseException as exc:
        failed = exc
        raise
    finally:
        # What is in hand is finished and answered first (its outcomes written, its leases
        # given back); then, after an error of the group, every item not answered fails with it.
        sender.shutdown(wait=True)
        settler.shutdown(wait=True)
        if failed is not None:
            for e in entries:
                fail(e, failed)


def _settled(settling: list[Future[None]]) -> None:
    """Every batch's outcomes written; the first failure raised, any later one logged (none is
    lost unseen)."""
    errors: list[BaseException] = []
    for done in settling:
        error = done.exception()
        if error is not None:
            errors.append(error)
    for extra in errors[1:]:
        log.error("group commit: another batch's outcomes failed too: %r", extra)
    if errors:
        raise errors[0]


def _next_batch(
    store: Store,
    sender: ThreadPoolExecutor,
    settler: ThreadPoolExecutor,
    previous: Future[Future[None]] | None,
    batch: list[Item],
    settling: list[Future[None]],
) -> Future[Future[None]] | None:
    """Write ``batch``'s intents, then, once the previous batch's PUTs are answered (its
    outcomes go on being written on ``settler``, kept in ``settling``) and the outcomes of the
    one before it are written, send it on ``sender``; its future (None when nothing of it was
    recorded). So the outcomes lag the PUTs by one batch at most: a slow manifest slows the
    sending instead of letting sent-but-unrecorded segments pile up, and a failure to write
    them ends the group within a batch."""
    rows = _register(store, batch)
    if previous is not None:
        settling.append(previous.result())
        if len(settling) >= 2:
            settling[-2].result()
    if rows is None:
        return None
    return sender.submit(_ship_batch, store, settler, batch, rows)


def _prepare(store: Store, e: Item) -> bool:
    """The file's size and identity, or the item's future fails (nothing recorded)."""
    try:
        st = stat_file(e.path)
    except UploaderError as exc:
        fail(e, exc)
        return False
    e.size, e.identity = st.st_size, (st.st_dev, st.st_ino)
    return True


def _one_at_a_time(store: Store, e: Item) -> None:
    """The writer's seal for this item: a registered key or a file bigger than a part."""
    try:
        inner = store.segment(e.key, e.path).seal()
    except Exception as exc:  # refused (busy, conflict), or the manifest failed: this item's
        fail(e, exc)
        return

    def relay(done: Future[CommitResult]) -> None:
        try:
            result = done.result()
        except BaseException as exc:  # the seal's failure is this item's
            fail(e, exc)
        else:
            resolve(e, result)

    inner.add_done_callback(relay)


def _register(store: Store, batch: list[Item]) -> list[Sealed | None] | None:
    """The batch's intents in one transaction, each new segment's lease held from here; None
    when nothing of it was recorded (each item's future has failed)."""
    try:
        rows = store.manifest.seal_small_many(
            [
                SmallSeal(
                    e.key,
                    e.path,
                    e.size,
                    p.md5,
                    p.crc32c,
                    e.identity,
                    checksum="md5" if p.md5 is not None else "crc32c",
                )
                for e in batch
                if (p := e.payload) is not None
            ],
            node=store.node,
            part_size=store.part_size,
            worker=store.worker,
            lease_ttl=store.lease_seconds,
        )
    except Exception as exc:  # nothing of the batch was recorded (an outage, a bad row)
        for e in batch:
            fail(e, exc)
        return None
    for row in rows:
        if row is not None:
            store.keeper.hold(row[0])
    return rows


def _ship_batch(
    store: Store, settler: ThreadPoolExecutor, batch: list[Item], rows: list[Sealed | None]
) -> Future[None]:
    """Send the batch's PUTs; the future of its drives and outcomes, taken on ``settler``."""
    sending: list[tuple[Item, Sealed, Future[DriveResult]]] = []
    ready: list[tuple[Item, Sealed, Payload, dict[str, str]]] = []
    for e, row in zip(batch, rows, strict=True):
        if row is None:  # registered before: the one-at-a-time path says what it is
            e.payload = None
            _one_at_a_time(store, e)
            continue
        lease, seg, commit = row
        payload, e.payload = e.payload, None
        assert payload is not None  # read before its intent was written
        if store.transport.stop.is_set():
            let_go(store, lease)  # a recovery worker claims it at once
            fail(e, interrupted(e))
            continue
        metadata, record_first = objectmeta.put_metadata(seg, commit)
        if record_first:
            # Its record sidecar goes first: the driver's own PUT step writes it, then sends the
            # bytes read again from the file (checked against the recorded CRC32C), so that
            # none of this batch's bytes outlives its PUTs.
            fresh: dict[int, Payload | None] = {commit.id: None}
            sending.append((e, row, store._puts.submit(drive_item, store, e, row, fresh)))
            continue
        ready.append((e, row, payload, metadata))
    # The PUTs the drives would send first (their first step, as the intents left them), sent
    # together: on S3 as coroutines, `concurrency` at a time, no thread per request. Each drive
    # then takes its PUT's answer as its own, with the same proof.
    deep = store.driver.verify_mode is VerifyMode.DEEP  # each object read back: on the pool
    try:
        answers = put_many(
            store.storage,
            [PutItem(seg.key, payload, md) for _e, (_l, seg, _c), payload, md in ready],
            concurrency=store.concurrency,
            stop=store.transport.stop.is_set,
        )
    except Exception as exc:  # no answer is known: each item's attempt failed with it
        answers = [PutAnswer(error=exc) for _ in ready]
    for answer in answers:
        drop_frames(answer.error)
    answered: list[tuple[Item, Sealed, PutAnswer]] = []
    for (e, row, _payload, _md), answer in zip(ready, answers, strict=True):
        if not answer.sent:  # interrupted before its turn: sealed, its part pending
            let_go(store, row[0])  # a recovery worker claims it at once
            fail(e, interrupted(e))
            continue
        answered.append((e, row, answer))
    del ready  # the bytes: a drive that takes its PUT's answer sends nothing again
    return settler.submit(finish_batch, store, sending, answered, deep)
