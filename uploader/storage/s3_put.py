"""S3's single-request writes: ``put`` (one conditional PutObject) and ``put_many`` (a batch of
them as coroutines on s3fs's event loop).

A PUT is three steps, shared by both: the **plan** (the checks and headers, taken on the caller's
thread: the crc32c mode's checks of the body, and, where the remote ignores ``If-None-Match`` on
PUT, a HEAD first), the **request**, and the **answer** (what its response proves; a 412 means an
object is at the key already: it is ours when a HEAD finds it as expected, else it is refused).
``put_many`` sends a batch's requests from one thread, ``concurrency`` at a time, instead of one
thread per request, each waking the loop and being woken by it: the group commit's small
segments (:mod:`uploader.group`) cost that much less CPU each. Every PUT of a batch gets the
same proof as :meth:`S3Puts.put`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fsspec.asyn import sync

from uploader.digest import Payload, check_body_crc32c, crc32c_b64, normalize_etag
from uploader.errors import ObjectExistsError, StorageError
from uploader.part_stream import part_bytes, streamed
from uploader.storage.base import Expected, ObjectInfo, PutAnswer, PutItem, put_each
from uploader.storage.rules import matches
from uploader.storage.s3_objects import S3Objects
from uploader.storage.s3_requests import _b64md5, _PartBody


@contextlib.contextmanager
def _body(payload: Payload, key: str, number: int) -> Iterator[io.IOBase]:
    """The request body of a part or a PUT: the bytes held, shared (a small segment's PUT), or
    read from the file as they are sent, checked against the payload's CRC32C (every part: no
    whole part in memory). An empty range has nothing to stream."""
    if payload.data is not None or payload.size == 0:
        yield _PartBody(part_bytes(payload, key=key, number=number))
        return
    with streamed(payload, key=key, number=number) as reader:
        yield reader


@dataclass(frozen=True)
class _Plan:
    """One PUT, checked and ready to send."""

    key: str
    payload: Payload
    expected: Expected
    request: dict[str, Any]  # PutObject's arguments but the body
    declare: bool  # CRC32C declared: the response teaches whether the remote keeps it
    conditional: bool


def _unknown(plan: _Plan, exc: BaseException) -> StorageError:
    """A PUT whose request ended without an answer (cancelled, or the loop failed): whether the
    object was written is not known; retryable (the PUT is conditional: a retry that finds our
    object adopts it)."""
    return StorageError(
        f"put_object of {plan.key!r}: no answer ({type(exc).__name__}: {exc}); whether the "
        "object was written is unknown",
        retryable=True,
    )


class S3Puts(S3Objects):
    """The PUTs of :class:`~uploader.storage.s3.S3Storage`."""

    def put(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        plan = self._put_plan(key, payload, metadata, self.conditional_put())
        if isinstance(plan, ObjectInfo):
            return plan
        try:
            with _body(payload, key, 1) as body:
                out = self._call("put_object", key, Body=body, **plan.request)
        except ObjectExistsError as exc:
            return self._put_exists(plan, exc)
        return self._put_answer(plan, out)

    def put_many(
        self,
        items: Sequence[PutItem],
        *,
        concurrency: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[PutAnswer]:
        """Each item's :meth:`put`, its requests sent as coroutines, ``concurrency`` at a time;
        see :func:`uploader.storage.base.put_many`.

        Where the remote ignores ``If-None-Match`` on PUT (each PUT needs a HEAD first), or a
        payload's bytes are not held (they would be read from its file on the event loop's
        thread), the batch is :func:`~uploader.storage.base.put_each`: the same PUTs on threads.
        """
        try:
            conditional = self.conditional_put()  # probed once per instance
        except Exception as exc:  # as each put would raise it (the retry layer may try again)
            return [PutAnswer(error=exc) for _ in items]
        if not conditional or any(it.payload.data is None and it.payload.size for it in items):
            return put_each(self, items, concurrency=concurrency, stop=stop)
        answers: list[PutAnswer] = [PutAnswer() for _ in items]
        plans: list[tuple[int, _Plan]] = []
        for i, it in enumerate(items):
            try:
                plan = self._put_plan(it.key, it.payload, it.metadata, conditional=True)
            except Exception as exc:  # this item's answer; the others are still sent
                answers[i] = PutAnswer(error=exc)
                continue
            assert isinstance(plan, _Plan)  # conditional: no HEAD first, so nothing found
            plans.append((i, plan))

        async def send_all() -> list[Any]:
            gate = asyncio.Semaphore(max(1, concurrency))

            async def send(plan: _Plan) -> Any:
                async with gate:
                    if stop is not None and stop():
                        return None  # not sent
                    with _body(plan.payload, plan.key, 1) as body:
                        return await self._acall("put_object", plan.key, Body=body, **plan.request)

            # Every request has ended (answered, failed or cancelled) before this returns: no
            # PUT of the batch is still in flight when its answers are taken.
            return await asyncio.gather(*(send(p) for _i, p in plans), return_exceptions=True)

        try:
            outs = sync(self.fs.loop, send_all) if plans else []
        except Exception as exc:  # the loop itself failed: no answer is known
            outs = [_unknown(plan, exc) for _i, plan in plans]
        for (i, plan), out in zip(plans, outs, strict=True):
            if out is None:
                continue
            try:
                if isinstance(out, ObjectExistsError):
                    answers[i] = PutAnswer(info=self._put_exists(plan, out))
                elif isinstance(out, asyncio.CancelledError):
                    answers[i] = PutAnswer(error=_unknown(plan, out))
                elif isinstance(out, Exception):  # as put() would raise it
                    answers[i] = PutAnswer(error=out)
                elif isinstance(out, BaseException):
                    raise out  # KeyboardInterrupt, SystemExit: not an answer
                else:
                    answers[i] = PutAnswer(info=self._put_answer(plan, out))
            except Exception as exc:
                answers[i] = PutAnswer(error=exc)
        return answers

    def _put_plan(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None, conditional: bool
    ) -> _Plan | ObjectInfo:
        """The PUT's checks and arguments; or the object already at the key when it is ours
        (only where the remote ignores ``If-None-Match`` on PUT, ``conditional`` False: found
        by a HEAD first)."""
        crc = crc32c_b64(payload.crc32c)
        if payload.md5 is None:
            # The crc32c mode: no MD5, so no Content-MD5 and no ETag to expect; the object's own
            # CRC32C must be the payload's.
            self._require_crc32c("put_object", key)
            check_body_crc32c("put_object", key, 1, payload)
            expected = Expected(
                size=payload.size, parts=((payload.crc32c, payload.size),), multipart=False
            )
        else:
            expected = Expected(size=payload.size, etag=payload.md5)
        if not conditional:
            # Checked first where the remote ignores If-None-Match on PUT (s3rver): it would
            # replace the object there with ours.
            existing = self.head(key)
            if existing is not None:
                if matches(existing, expected):
                    return existing
                raise ObjectExistsError(
                    f"put of {key!r} in {self.bucket!r}: an object already exists at the key "
                    f"({existing.size} bytes, etag {existing.etag}); refusing to overwrite it"
                )
        declare = self._crc32c is not False
        request: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Metadata": dict(metadata or {}),
            "IfNoneMatch": "*",
        }
        if declare:
            request |= {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc}
        if payload.md5 is not None:
            request["ContentMD5"] = _b64md5(payload.md5)
        return _Plan(key, payload, expected, request, declare, conditional)

    def _put_exists(self, plan: _Plan, refused: ObjectExistsError) -> ObjectInfo:
        """The PUT's condition failed: the object at the key is ours only if it is what we
        expected (a lost response to our own PUT); anything else is ``refused``."""
        info = self.head(plan.key)
        if matches(info, plan.expected):
            assert info is not None
            return info
        raise refused

    def _put_answer(self, plan: _Plan, out: Any) -> ObjectInfo:
        """What the PUT's response proves."""
        payload = plan.payload
        crc = crc32c_b64(payload.crc32c)
        by_crc = payload.md5 is None
        # The server checked the body against Content-MD5. Its ETag may still not be the MD5
        # (SSE-KMS, SSE-C): returned as said; the caller proves the object by reading it back
        # when the ETag does not prove it (see uploader.plan).
        etag = normalize_etag(out.get("ETag"))
        echoed = out.get("ChecksumCRC32C")
        if plan.declare and not (by_crc and not echoed):
            # (A crc32c-mode PUT whose response lacks the checksum teaches nothing here: the
            # HEAD that follows finds whether the object has it, else its bytes are read back.)
            self._learn_crc32c(bool(echoed), "put_object", plan.key)
        # Proven by its own response: nothing was replaced (the condition is honoured) and the
        # remote checksummed our bytes: it echoed their CRC32C, or its ETag is their MD5 (the md5
        # mode, Ceph RGW). Anything less (SSE-KMS ETags): the caller HEADs.
        proven = plan.conditional and (
            echoed == crc or (payload.md5 is not None and etag == payload.md5)
        )
        return ObjectInfo(
            key=plan.key, size=payload.size, etag=etag, checksum=echoed or None, proven=proven
        )

    def _require_crc32c(self, op: str, key: str) -> None:
        if self._crc32c is False:
            raise StorageError(
                f"{op} of {key!r} in {self.bucket!r}: the segment is recorded in the crc32c "
                "checksum mode (no part MD5s) but this remote keeps no CRC32C checksums (or the "
                "storage option checksum='md5' forbids them): its bytes cannot be proven here",
                retryable=False,
            )
