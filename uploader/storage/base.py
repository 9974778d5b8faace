"""The one storage interface every upload and every recovery goes through.

Words:

* **upload**: an unfinished multipart upload for a key, named by an ``upload_id`` the remote chose.
  Nothing is visible at the key while an upload is unfinished.
* **part**: a numbered byte range of the object (1..10,000). Sending the same part number twice
  replaces it (idempotent by part number), which is what makes re-sends after lost responses safe.
* **complete**: publish the object whole, at once, from parts in ascending order.

Implementations: :mod:`uploader.storage.s3` (native multipart through s3fs's raw calls) and
:mod:`uploader.storage.staged` (any other fsspec filesystem: parts staged under a hidden prefix of
the root, published with an atomic rename). :mod:`uploader.storage.faults` wraps either to inject
faults. The same contract suite (``tests/storage/test_contract.py``) runs against all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from uploader.digest import Payload

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000


@dataclass(frozen=True, slots=True)
class PartRef:
    """A part as the remote holds it (or as we ask to complete with it)."""

    number: int
    etag: str  # normalised: no quotes, lower case
    size: int = -1  # -1 when unknown (complete() does not need it)
    #: The part's CRC32C as recorded (complete() names it where the remote checks checksums).
    crc32c: int | None = None
    #: An acknowledgement whose ETag is not the part's MD5 (SSE-KMS) but whose echoed CRC32C is
    #: the part's: the remote proved it holds our bytes by their checksum instead.
    proven_by_checksum: bool = False


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None  # normalised; None where the backend cannot tell
    #: The object's CRC32C as the remote reports it (base64; a multipart object's is the
    #: composite ``<crc of the part crcs>[-N]`` or, FULL_OBJECT, the whole object's), or None
    #: where the remote keeps no additional checksum.
    checksum: str | None = None
    #: What a write's own response proved: the remote honours its condition (no object was
    #: overwritten) and echoed the checksum of the bytes we sent. As good as a HEAD right after.
    #: (Not part of what the object is: two ObjectInfo for the same object compare equal.)
    proven: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class UploadRef:
    """An unfinished upload found under the root."""

    key: str
    upload_id: str
    initiated: datetime | None  # UTC, naive


@dataclass(frozen=True, slots=True)
class Expected:
    """What a completed object must look like: lets complete() accept a lost-response retry."""

    size: int
    etag: str | None = None
    #: In the ``crc32c`` checksum mode (no part MD5s, so no ETag to expect): each part's
    #: ``(crc32c, size)`` in order; the object must report the CRC32C they give (COMPOSITE for
    #: a multipart object, its own for a PUT). An object reporting none does not match.
    parts: tuple[tuple[int, int], ...] | None = None
    multipart: bool = True


@dataclass(frozen=True, slots=True)
class PutItem:
    """One :meth:`Storage.put` of a batch (:func:`put_many`)."""

    key: str
    payload: Payload
    metadata: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class PutAnswer:
    """What one PUT of a batch came to: what :meth:`Storage.put` returned (``info``) or raised
    (``error``), or neither: it was not sent (the batch was told to stop before its turn)."""

    info: ObjectInfo | None = None
    error: Exception | None = None

    @property
    def sent(self) -> bool:
        return self.info is not None or self.error is not None


@runtime_checkable
class Storage(Protocol):
    """Atomic object storage under one root. Keys are relative to the root and already validated."""

    @property
    def url(self) -> str:
        """The root URL, without credentials."""
        ...

    @property
    def min_part_size(self) -> int:
        """Smallest size allowed for a part that is not the last one."""
        ...

    def check_key(self, key: str) -> None:
        """Refuse (InvalidKeyError) a key, already validated, that this remote cannot store.

        The name as the remote sees it (its prefix + ``/`` + key) and each path component must fit
        the remote's limits (S3: 1024 bytes in all; a local disk: its name and path limits, less
        what the backend adds to names it derives from the key). Asks the remote nothing.
        """
        ...

    def start_upload(self, key: str, metadata: Mapping[str, str] | None = None) -> str:
        """Begin a multipart upload for ``key``; return its upload id.

        ``metadata`` (see :mod:`uploader.objectmeta`) is published with the completed object:
        S3 user metadata; staged backends keep it beside the bytes, published with them.
        """
        ...

    def upload_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartRef:
        """Send one part (idempotent by part number). The returned ETag equals ``payload.md5``."""
        ...

    def list_parts(self, key: str, upload_id: str) -> list[PartRef]:
        """The parts the remote holds for an upload, ascending. NoSuchUploadError if unknown;
        UnsupportedOperationError where the remote does not implement ListParts (s3rver)."""
        ...

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[PartRef],
        expected: Expected | None = None,
    ) -> ObjectInfo:
        """Publish the object from ``parts`` (ascending, each but the last >= min_part_size).

        Refuses to overwrite an existing object (ObjectExistsError) unless it already matches
        ``expected`` (a completion whose response was lost). If the upload id is unknown, the
        object at the key is accepted when it matches ``expected``; otherwise NoSuchUploadError.
        """
        ...

    def abort(self, key: str, upload_id: str) -> None:
        """Drop an unfinished upload and its parts. Aborting an unknown upload is not an error."""
        ...

    def put(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Publish a small object in one atomic write (refuses to overwrite, like complete()),
        with ``metadata`` like :meth:`start_upload`."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of the object at ``key``, or None if there is none. The ETag is not
        always the MD5 (of the bytes, or of the part MD5s): s3rver gives multipart objects a plain
        MD5, SSE-KMS another string; callers that must prove an object read it back then."""
        ...

    def read(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object at ``key``."""
        ...

    def head_metadata(self, key: str) -> tuple[ObjectInfo, dict[str, str]] | None:
        """What :meth:`head` says, and the metadata published with the object ({} if none)."""
        ...

    def list_objects(self, prefix: str = "") -> list[str]:
        """Keys of the objects under the root whose key starts with ``prefix``, sorted; the
        hidden prefix ``.uploader/`` is never listed."""
        ...

    def write_hidden(self, name: str, data: bytes) -> None:
        """Write (or replace) the small object ``.uploader/<name>`` (record sidecars)."""
        ...

    def read_hidden(self, name: str) -> bytes | None:
        """The small object ``.uploader/<name>``, or None if there is none."""
        ...

    def list_hidden(self, prefix: str) -> list[str]:
        """The names (as :meth:`read_hidden` takes them) of the small objects ``.uploader/<name>``
        whose name starts with ``prefix``, sorted. ``prefix`` names a folder and the start of
        a name in it (``records/ab/abcd.``): nothing beneath a deeper folder is listed."""
        ...

    def list_uploads(self, prefix: str = "") -> list[UploadRef]:
        """Unfinished uploads whose key starts with ``prefix`` (relative to the root); a
        capability probe's own upload (under ``.uploader/probe/``) is never listed."""
        ...

    def delete_if_match(self, key: str, etag: str) -> None:
        """Remove the object at ``key`` only if its ETag (as :meth:`head` reports it) is ``etag``.

        Another object at the key: PreconditionFailedError, and it stays untouched. No object at
        the key: nothing to do. There is deliberately no unconditional delete: a destructive call
        always names the exact object it means.
        """
        ...

    def conditional_delete(self) -> bool:
        """Whether :meth:`delete_if_match` is proved to be honoured by this remote.

        False means the remote was seen ignoring the condition (or refusing it): a caller must not
        rely on ``delete_if_match`` to protect another object there.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def keeps_crc32c(storage: Storage) -> bool:
    """Whether ``storage`` proved that it keeps and echoes CRC32C checksums (probed once per
    instance by S3; a backend without the probe, staged ones included, keeps none we can use)."""
    probe = getattr(storage, "keeps_crc32c", None)
    return bool(probe()) if callable(probe) else False


def prepare_complete(storage: Storage) -> None:
    """Let ``storage`` learn what its Complete needs to know ahead of time (S3: whether
    If-None-Match is honoured, probed in the background); nothing for other backends."""
    prepare = getattr(storage, "prepare_complete", None)
    if callable(prepare):
        prepare()


def put_many(
    storage: Storage,
    items: Sequence[PutItem],
    *,
    concurrency: int,
    stop: Callable[[], bool] | None = None,
) -> list[PutAnswer]:
    """Each item's :meth:`Storage.put`, answered in order; one item's failure is its own answer,
    not the batch's. ``stop`` is asked before each PUT starts: once it says yes, the PUTs not yet
    started are not sent. At most ``concurrency`` PUTs are in flight.

    A backend whose class defines ``put_many`` (S3: the PUTs as coroutines on its event loop, no
    thread per request) sends the batch itself; any other storage gets :func:`put_each`. Only
    the class is asked, never the instance: a wrapper that forwards unknown attributes to the
    storage it wraps must not let a batch go around its own ``put``."""
    batched = getattr(type(storage), "put_many", None)
    if callable(batched):
        answers: list[PutAnswer] = batched(storage, items, concurrency=concurrency, stop=stop)
        return answers
    return put_each(storage, items, concurrency=concurrency, stop=stop)


class _Puts(Protocol):
    def put(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo: ...


def put_each(
    storage: _Puts,
    items: Sequence[PutItem],
    *,
    concurrency: int,
    stop: Callable[[], bool] | None = None,
) -> list[PutAnswer]:
    """:func:`put_many` as one :meth:`Storage.put` per item, ``concurrency`` threads at a time."""

    def one(it: PutItem) -> PutAnswer:
        if stop is not None and stop():
            return PutAnswer()
        try:
            return PutAnswer(info=storage.put(it.key, it.payload, it.metadata))
        except Exception as exc:  # this item's answer; the others are still sent
            return PutAnswer(error=exc)

    if len(items) <= 1 or concurrency <= 1:
        return [one(it) for it in items]
    with ThreadPoolExecutor(
        min(concurrency, len(items)), thread_name_prefix="uploader-put"
    ) as pool:
        return list(pool.map(one, items))
