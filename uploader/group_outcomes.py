"""The group commit's items and outcomes (see :mod:`uploader.group`): each item's future, the drives
that take a batch's PUT answers as their own, and the one transaction that writes the batch's
outcomes, then answers each future and gives back or drops each lease.

Runs on the group's settler thread while the next batch's PUTs are out; it holds none of the
batch's bytes (a drive that has its PUT's answer sends nothing again).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uploader.digest import Payload
from uploader.drive_state import Deferred, DriveResult
from uploader.errors import UploaderError, VerificationError, WorkInterruptedError
from uploader.futures import CommitResult, UploadFuture
from uploader.records import Lease
from uploader.seal import sealed
from uploader.storage.base import PutAnswer
from uploader.transport import Counters

if TYPE_CHECKING:
    from uploader.manifest.batches import Sealed
    from uploader.store import Store

log = logging.getLogger("uploader")


@dataclass
class Item:
    key: str
    path: str
    fut: UploadFuture[CommitResult]
    size: int = 0
    identity: tuple[int, int] | None = None
    payload: Payload | None = None
    counters: Counters = field(default_factory=Counters)
    deferred: Deferred = field(default_factory=Deferred)


def fail(e: Item, exc: BaseException) -> None:
    # Answered already (by its seal's relay, racing an error of the whole group): kept.
    with contextlib.suppress(InvalidStateError):
        e.fut.set_exception(exc)


def resolve(e: Item, result: CommitResult) -> None:
    # Failed already (an error of the whole group): kept; what was written stays written.
    with contextlib.suppress(InvalidStateError):
        e.fut.set_result(result)


def drop_frames(exc: BaseException | None) -> None:
    """Drop the traceback of a failed request's error (and of its causes'): its frames, and the
    callers' frames they link to (the pool's work item), hold the request's bytes, which would
    otherwise live as long as the item's future keeps the error (a remote refusing every PUT
    would keep every file shipped in memory). The error keeps its type and message, which is
    what the item's future and the logs say."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def finish_batch(
    store: Store,
    sending: list[tuple[Item, Sealed, Future[DriveResult]]],
    answered: list[tuple[Item, Sealed, PutAnswer]],
    deep: bool,
) -> None:
    """Each answered PUT's drive, then the batch's outcomes in one transaction."""
    for e, row, answer in answered:
        commit = row[2]
        # Fresh (recorded, never sent before this batch), its bytes not needed: the drive takes
        # the PUT's answer as its own and sends nothing.
        args = (store, e, row, {commit.id: None}, {commit.id: answer})
        if answer.info is not None and answer.info.proven and not deep:
            # Nothing left to ask the remote: taken here, no thread needed.
            sending.append((e, row, run_here(drive_item, *args)))
        else:  # a HEAD or a read back may follow: overlapped on the pool
            sending.append((e, row, store._puts.submit(drive_item, *args)))
    wait([d for _e, _row, d in sending])
    settle(store, sending)


def run_here(fn: Callable[..., DriveResult], *args: Any) -> Future[DriveResult]:
    """``fn(*args)`` run on this thread, as a finished future (like the pool's)."""
    done: Future[DriveResult] = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as exc:  # the drive's failure is the item's, as on the pool
        done.set_exception(exc)
    return done


def drive_item(
    store: Store,
    e: Item,
    row: Sealed,
    fresh: Mapping[int, Payload | None],
    answered: Mapping[int, PutAnswer] | None = None,
) -> DriveResult:
    """The item's segment driven by the one driver, its outcome deferred to the batch's."""
    if not answered and store.transport.stop.is_set():
        raise interrupted(e)  # interrupted while this PUT waited for a thread
    lease, seg, commit = row
    return store.driver.drive(
        lease,
        fresh=fresh,
        counters=e.counters,
        release=True,
        deferred=e.deferred,
        known=(seg, [commit]),  # as the intents' transaction wrote them
        answered=answered,
    )


def interrupted(e: Item) -> WorkInterruptedError:
    return WorkInterruptedError(
        f"interrupted: segment {e.key!r} is sealed, its PUT not started; `uploader recover` "
        "finishes it"
    )


def settle(store: Store, sending: list[tuple[Item, Sealed, Future[DriveResult]]]) -> None:
    """Write the batch's outcomes in one transaction, then answer each item's future."""
    proven = [e.deferred.proven for e, _r, _d in sending if e.deferred.proven is not None]
    failed = [e.deferred.failed for e, _r, _d in sending if e.deferred.failed is not None]
    try:
        refused = store.manifest.settle_puts(proven, failed)
    except Exception as exc:
        # Nothing of the outcomes was written: each segment is sealed, its part pending, and
        # recovery finds the objects and checks them again.
        for e, (lease, _s, _c), _d in sending:
            fail(e, exc)
            let_go(store, lease)
        return
    for e, (lease, seg, _c), driven in sending:
        why = refused.get(seg.id)
        if why is not None:
            store.keeper.forget(lease)
            fail(e, why)
            continue
        proof = e.deferred.proven
        if proof is not None:
            store.keeper.drop(seg.id)  # given back by the outcome's transaction
            resolve(
                e,
                CommitResult(
                    key=e.key,
                    sent_bytes=e.counters.bytes_sent,
                    sent_parts=e.counters.parts_sent,
                    committed=e.size,
                    carried_bytes=0,
                    sealed=True,
                    verified=True,
                    object_etag=proof.object_etag,
                ),
            )
            continue
        error = driven.exception()
        if error is None:  # the drive wrote its own outcome (a path other than a proven PUT)
            try:
                resolve(e, sealed(e.key, driven.result(), e.counters, e.size))
            except (UploaderError, VerificationError) as err:
                fail(e, err)
            if not driven.result().verified:
                let_go(store, lease)
            else:
                store.keeper.drop(seg.id)
            continue
        fail(e, error)
        let_go(store, lease)


def let_go(store: Store, lease: Lease) -> None:
    """Give back the lease of a segment this batch did not finish, so that a recovery worker
    claims it at once (as a writer's seal does); if that fails too, the lease expires."""
    try:
        store.keeper.release(lease.segment_id)
    except Exception as exc:
        log.warning("could not release the lease on %r: %s", lease.key, exc)
        with contextlib.suppress(Exception):
            store.keeper.forget(lease)
