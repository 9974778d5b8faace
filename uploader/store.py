"""The library users call: ``uploader.open(...)``, ``Store.segment``, ``Segment.commit/seal``.

A :class:`Store` joins one manifest and one remote root. ``store.segment(key, path)`` registers a
segment (idempotent by key) and takes its lease; a heartbeat renews the leases while the store is
open. ``commit()`` and ``seal()`` return futures; whatever happens to them, the manifest keeps every
unfinished part ``pending`` with its attempts and last error, so the recovery job finishes what the
caller never looked at (the RocketMQ ``commitAsync`` loss cannot happen here).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from uploader import config as config_mod
from uploader import group, recovery
from uploader.config import ChecksumMode, StoreConfig, VerifyMode
from uploader.config import resolve as resolve_config
from uploader.driver import Driver
from uploader.errors import (
    KeyConflictError,
    LocalFileError,
    StorageError,
    StoreClosedError,
    UsageError,
)
from uploader.futures import CommitResult, UploadFuture
from uploader.keys import validate_key
from uploader.leases import LeaseKeeper
from uploader.manifest.repo import Manifest, default_node, default_worker
from uploader.segment import Segment
from uploader.states import SegmentState
from uploader.storage import open_storage
from uploader.storage.base import MAX_PART_SIZE, Storage, keeps_crc32c
from uploader.transport import Transport, file_identity
from uploader.upkeep import Upkeep

log = logging.getLogger("uploader")

DEFAULT_PART_SIZE = config_mod.DEFAULT_PART_SIZE  # kept importable from here

# Defined in their own modules, importable from here as they always were.
__all__ = [
    "DEFAULT_PART_SIZE",
    "CommitResult",
    "Segment",
    "Store",
    "UploadFuture",
    "open",
]


class Store(Upkeep):
    """A manifest and a remote root. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        manifest: Manifest,
        storage: Storage,
        config: StoreConfig | None = None,
        *,
        part_size: int | None = None,
        concurrency: int | None = None,
        verify: str | VerifyMode | None = None,
        node: str | None = None,
        worker: str | None = None,
        lease_seconds: float | None = None,
        checksum: str | ChecksumMode | None = None,
    ) -> None:
        """``config`` holds the settings (:class:`~uploader.config.StoreConfig`); a keyword
        argument given here overrides its field of the same name."""
        cfg = resolve_config(
            config,
            part_size=part_size,
            concurrency=concurrency,
            verify=verify,
            node=node,
            worker=worker,
            lease_seconds=lease_seconds,
            checksum=checksum,
        )
        if cfg.part_size < storage.min_part_size or cfg.part_size > MAX_PART_SIZE:
            raise UsageError(
                f"part_size {cfg.part_size} is outside [{storage.min_part_size}, {MAX_PART_SIZE}] "
                f"for {storage.url}"
            )
        self.config = _named(cfg)
        self.manifest = manifest
        self.storage = storage
        self.transport = Transport(storage, concurrency=cfg.concurrency)
        self.keeper = LeaseKeeper(manifest, cfg.lease_seconds)
        self.driver = Driver(
            manifest, storage, self.transport, self.keeper, node=self.node, verify=cfg.verify
        )
        # Segment jobs wait on part futures: a pool of their own so they cannot starve the parts.
        self._jobs = ThreadPoolExecutor(
            max_workers=max(2, cfg.concurrency), thread_name_prefix="uploader-job"
        )
        # A group commit's PUTs (ship_many): a pool of their own, as they wait for slots that
        # parts queued on the transport's pool may hold.
        self._puts = ThreadPoolExecutor(
            max_workers=cfg.concurrency, thread_name_prefix="uploader-put"
        )
        self._pending: set[Future[Any]] = set()
        self._segments: dict[str, Segment] = {}
        self._state_lock = threading.Lock()
        self._closed = False

    # The settings, read from the one config (frozen: they do not change under running jobs).

    @property
    def part_size(self) -> int:
        return self.config.part_size

    @property
    def concurrency(self) -> int:
        return self.config.concurrency

    @property
    def lease_seconds(self) -> float:
        return self.config.lease_seconds

    @property
    def verify_mode(self) -> VerifyMode:
        return self.config.verify

    @property
    def node(self) -> str:
        assert self.config.node is not None  # resolved in __init__
        return self.config.node

    @property
    def worker(self) -> str:
        assert self.config.worker is not None  # resolved in __init__
        return self.config.worker

    @property
    def on_bytes(self) -> Callable[[str, int], None] | None:
        """Progress hook: ``fn(key, nbytes)`` each time the remote acknowledges a part or an
        object of this store's work (commits, seals, recovery), or parts already at the remote
        are adopted; called from part threads, as it happens. Must be quick and thread-safe."""
        return self.driver.on_bytes

    @on_bytes.setter
    def on_bytes(self, fn: Callable[[str, int], None] | None) -> None:
        self.driver.on_bytes = fn

    @property
    def crew(self) -> recovery.Crew:
        """What the recovery job works with: this store's manifest, driver and leases."""
        return recovery.Crew(
            manifest=self.manifest,
            storage=self.storage,
            driver=self.driver,
            keeper=self.keeper,
            worker=self.worker,
            node=self.node,
            lease_seconds=self.lease_seconds,
            concurrency=self.concurrency,
        )

    # --- context ----------------------------------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, *, wait: bool = True) -> None:
        """Finish queued work (``wait``), release leases and connections. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.shutdown(wait=wait, cancel_futures=not wait)
        self._puts.shutdown(wait=True)
        self.transport.shutdown()
        self.keeper.stop(release=True)
        self.storage.close()
        self.manifest.close()

    def abandon(self) -> None:
        """Stop without finishing or releasing anything, as a crash would (for tests and demos)."""
        with self._state_lock:
            self._closed = True
        self.keeper.stop(release=False)
        self._jobs.shutdown(wait=True, cancel_futures=True)
        self._puts.shutdown(wait=True, cancel_futures=True)
        self.transport.shutdown()
        self.storage.close()
        self.manifest.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed; open a new one with uploader.open(...)")

    # --- segments ---------------------------------------------------------------------------------

    def segment(self, key: str, path: str | os.PathLike[str]) -> Segment:
        """Register (or reopen) the segment ``key`` for the local file ``path`` and lease it."""
        self._check_open()
        validate_key(key)
        self.storage.check_key(key)
        apath = os.path.abspath(os.fspath(path))
        if not os.path.isfile(apath):
            raise LocalFileError(
                f"{apath}: no such local file for segment {key!r}; create the file before "
                "registering it (nothing was recorded)"
            )
        with self._state_lock:
            existing = self._segments.get(key)
        if existing is not None:
            if existing.path != apath:
                raise KeyConflictError(
                    f"segment key {key!r} is open for {existing.path!r}, not {apath!r}"
                )
            # Never handed out without a live lease: taken again if it was lost and is free
            # (SegmentBusyError while another process holds it: ask again later).
            existing._ensure_lease()
            return existing
        record, lease = self.manifest.register_leased(
            key,
            apath,
            node=self.node,
            part_size=self.part_size,
            worker=self.worker,
            lease_ttl=self.lease_seconds,
            identity=file_identity(apath),
            checksum=self.new_segment_checksum(),
        )
        if lease is None and record.state is SegmentState.OPEN:
            # A dead predecessor's lease on this node is taken at once (see uploader.holders).
            lease = self.manifest.acquire(key, self.worker, self.lease_seconds, node=self.node)
        seg = Segment(self, record, lease)
        with self._state_lock:
            self._segments[key] = seg
        if lease is not None:
            self.keeper.hold(lease)
        return seg

    def new_segment_checksum(self) -> str:
        """The checksum mode a new segment is registered with ('md5' or 'crc32c'; see
        :class:`~uploader.config.ChecksumMode`). ``auto`` asks the remote once per storage
        instance whether it keeps and echoes CRC32C. Registering never waits for the remote:
        where it cannot answer now (unreachable, an outage), ``auto`` registers in md5, which
        every remote proves, and asks again for the next segment."""
        setting = self.config.checksum
        if setting is ChecksumMode.MD5:
            return "md5"
        try:
            kept = keeps_crc32c(self.storage)
        except StorageError as exc:
            if setting is ChecksumMode.CRC32C:
                raise
            log.info(
                "checksum mode md5 for now: %s cannot say whether it keeps CRC32C (%s)",
                self.storage.url,
                exc,
            )
            return "md5"
        if kept:
            return "crc32c"
        if setting is ChecksumMode.CRC32C:
            raise UsageError(
                f"checksum='crc32c' but {self.storage.url} did not prove that it keeps and echoes "
                "CRC32C checksums; use checksum='auto' or 'md5' for this remote"
            )
        return "md5"  # never weaker than before where the remote keeps no CRC32C

    def ship_many(
        self, items: Iterable[tuple[str, str | os.PathLike[str]]]
    ) -> list[UploadFuture[CommitResult]]:
        """Register and seal many whole files as segments (``(key, path)`` each): one future
        per item, in order, as ``segment(key, path).seal()`` would give.

        New segments no bigger than a part go as a group commit (:mod:`uploader.group`): their
        intents in one transaction per batch, the PUTs overlapped, their outcomes in one
        transaction per batch; the others take the one-at-a-time path. Registration runs off
        the caller's thread: a missing file, a key registered for another path, a segment another
        process holds (``SegmentBusyError``, not taken from it) fail that item's future only. An
        invalid or repeated key raises here, before anything is recorded.
        """
        return group.submit(self, items)

    def _submit_group(self, run: Callable[[], None], futures: list[UploadFuture[Any]]) -> None:
        """Run a group commit on the job pool; its futures are cancelled by :meth:`interrupt`
        while they have not started."""
        with self._state_lock:
            if self._closed:
                raise StoreClosedError(
                    "the store is closed; open a new one with uploader.open(...)"
                )
            for fut in futures:
                self._pending.add(fut)
                fut.add_done_callback(self._pending.discard)
            self._jobs.submit(run)

    def _submit_job(self, run: Callable[[], None], fut: Future[Any]) -> None:
        with self._state_lock:
            if self._closed:
                raise StoreClosedError(
                    "the store is closed; open a new one with uploader.open(...)"
                )
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
            self._jobs.submit(run)

    def stop_sending(self) -> None:
        """No new part starts from now on (parts in flight finish and are recorded). Takes no
        lock of the store: safe to call from a signal handler."""
        self.transport.stop.set()

    def interrupt(self) -> None:
        """Stop taking new work (SIGINT): jobs not started are cancelled, no new part starts,
        parts in flight finish and are recorded. What is left stays recorded for recovery."""
        self.stop_sending()
        with self._state_lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()


def _named(cfg: StoreConfig) -> StoreConfig:
    """``cfg`` with its node and worker names resolved once (the config a store reports is the
    one it runs with), and checked again: a default name (the host's, ``UPLOADER_NODE``) must
    fit as a given one must."""
    return cfg.with_(node=cfg.node or default_node(), worker=cfg.worker or default_worker()).check()


def open(
    manifest: str,
    remote: str,
    *,
    storage_options: dict[str, Any] | None = None,
    config: StoreConfig | None = None,
    part_size: int | None = None,
    concurrency: int | None = None,
    verify: str | VerifyMode | None = None,
    node: str | None = None,
    worker: str | None = None,
    lease_seconds: float | None = None,
    storage: Storage | None = None,
    min_part_size: int | None = None,
    checksum: str | ChecksumMode | None = None,
) -> Store:
    """Open a store: a manifest (SQLAlchemy URL) and a remote root (fsspec URL).

    The settings are ``config`` (:class:`~uploader.config.StoreConfig`, defaults if None) with
    any keyword argument given here in place of its field: part size, concurrency, verify mode,
    node and worker names, lease length, checksum mode. They are checked before the manifest is opened.
    ``storage`` replaces the backend built from ``remote`` (e.g. a fault-injecting wrapper);
    ``min_part_size`` lowers S3's 5 MiB part minimum for test servers.
    """
    cfg = resolve_config(
        config,
        part_size=part_size,
        concurrency=concurrency,
        verify=verify,
        node=node,
        worker=worker,
        lease_seconds=lease_seconds,
        min_part_size=min_part_size,
        checksum=checksum,
    )
    cfg = _named(cfg)  # a bad default name is refused before the manifest is opened too
    m = Manifest.open(manifest)
    try:
        st = (
            storage
            if storage is not None
            else open_storage(
                remote, storage_options, min_part_size=cfg.min_part_size, retry=cfg.retry
            )
        )
        return Store(m, st, cfg)
    except BaseException:
        m.close()
        raise
