"""S3 through s3fs's raw calls: native multipart uploads whose ids and ETags we keep.

s3fs's file objects keep the upload id and part ETags in memory only, so they cannot resume after
a crash (and ``fs.open(..., "wb")`` completes the upload even on an exception). Here every call is
one S3 request through s3fs's ``_call_s3`` and its answer goes back to the caller for the manifest.

What we check ourselves because S3-compatible servers (moto among them) may not:

* each part is sent with ``Content-MD5`` and the returned ETag must equal our MD5;
* the part rules (sizes, count, ascending order) before ``complete``;
* ``complete`` and ``put`` are conditional (``If-None-Match: *``): an existing object is never
  overwritten; an object that matches what we expected (a lost response) is accepted.

Checksums. Uploads and PUTs declare CRC32C (``ChecksumAlgorithm``), every part carries its
CRC32C (``x-amz-checksum-crc32c``, base64 of the big-endian value taken when the part was read)
on top of ``Content-MD5``, Complete names each part's, and HEAD asks for the object's
(``ChecksumMode``): COMPOSITE for a multipart object (AWS ``<b64>-N``, moto without ``-N``), the
object's own for a PUT. Whether the remote keeps them is learned once per instance from its
answers (CreateMultipartUpload naming the algorithm back, PutObject echoing the checksum); where
it does not (Ceph RGW 16, which also refuses part checksums on Complete with InvalidPart), MD5
alone, as before. The storage option ``checksum`` (``auto``, ``crc32c``, ``md5``) sets it. MD5 is
never dropped: the manifest records every part's MD5 and the object's expected ETag.

Requests. Whether the remote honours ``If-None-Match`` on PutObject and on Complete is probed
once per instance (a probe object under ``.uploader/probe/``: a conditional second write must be
refused with 412). Where it is honoured no HEAD precedes the write: a multipart upload costs one
HEAD (after Complete: the object's ETag and checksum), a PUT whose response echoes our CRC32C
none (:attr:`ObjectInfo.proven`). Where it is ignored, the HEAD before the write stays.

Servers name an unknown (aborted or completed) upload id differently; on a call that names an
upload id each of these means "the upload is unknown" (:class:`NoSuchUploadError`):

* ``NoSuchUpload`` (AWS, moto);
* ``404 NoSuchKey`` (Ceph RGW's ListParts: its upload is an object the server no longer finds);
* a 5xx that ``ListMultipartUploads`` confirms: the id is not listed (Ceph RGW answers Complete of
  an aborted upload with ``500 InternalError`` "This multipart completion is already in
  progress"). A 5xx for an id that is still listed, or from a remote that cannot list uploads,
  stays a server error.

Ceph RGW also answers Complete with an empty ETag (the HEAD that follows every complete is what we
record) and ignores ``If-None-Match`` on Complete (the probe finds it: hence the HEAD before it
there) but honours it on PUT.

Retries and deadlines. :mod:`uploader.storage.retry` alone decides about retries: s3fs's own
retries are off (``retries = 1``) and so are botocore's (``total_max_attempts = 1``, whatever a
user's ``config_kwargs["retries"]`` says about counts; its ``mode`` is kept), so one call with the
endpoint down is exactly one connection attempt per retry-layer attempt. Every request runs as a
coroutine on s3fs's event loop under ``asyncio.timeout(request_timeout)``: at the deadline the
request is cancelled *and the cancellation awaited* (the connection is closed) before
:class:`StorageTimeoutError` reaches the retry layer, so no attempt it gave up on is still being
sent when it retries. (A request whose bytes all reached the server before the cut may still be
applied there: that is why parts are idempotent by number and completes, PUTs and deletes are
conditional.)

Conditional delete. ``delete_if_match`` sends ``If-Match``. Servers that ignore the header (some
Ceph RGW versions, older MinIO, s3rver) would delete anything: :meth:`S3Storage.conditional_delete`
proves the behaviour once per instance with a probe object under ``.uploader/probe/``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC
from typing import Any, NoReturn, TypeVar

import s3fs
from fsspec.asyn import sync

from uploader.digest import Payload, crc32c_b64, normalize_etag
from uploader.errors import (
    NoSuchUploadError,
    ObjectExistsError,
    PreconditionFailedError,
    StorageError,
    StorageTimeoutError,
    UnsupportedOperationError,
    UsageError,
)
from uploader.keys import check_full_length
from uploader.storage.base import MIN_PART_SIZE, Expected, ObjectInfo, PartRef, UploadRef
from uploader.storage.errors_map import client_error_code, is_unsupported, translate
from uploader.storage.rules import check_part_number, check_part_size, check_parts, matches

T = TypeVar("T")

#: Where the conditional-delete probe puts its object (the hidden prefix no key can reach).
PROBE_PREFIX = ".uploader/probe"
#: The hidden prefix (no key can reach it): probes, record sidecars.
HIDDEN_PREFIX = ".uploader/"
#: The ``checksum`` storage option: what proves the bytes a part or a PUT carries to the remote.
CHECKSUM_MODES = ("auto", "crc32c", "md5")
#: What a remote answers a Complete that names part checksums it does not hold (Ceph RGW 16:
#: InvalidPart; an upload started without CRC32C declared: InvalidRequest/InvalidArgument).
CHECKSUM_REFUSED_CODES = frozenset({"InvalidPart", "InvalidRequest", "InvalidArgument"})
#: Error codes that, on a call naming an upload id (the bucket exists: that is NoSuchBucket), mean
#: the upload is unknown. Ceph RGW's ListParts says NoSuchKey: without it, recovery would retry
#: ListParts of a lost upload forever instead of starting a fresh one.
UNKNOWN_UPLOAD_CODES = frozenset({"NoSuchUpload", "NoSuchKey"})


def _client_error(exc: BaseException) -> BaseException:
    """s3fs turns botocore's ClientError into OSError subclasses; the code is on the cause."""
    if getattr(exc, "response", None) is None and getattr(exc.__cause__, "response", None):
        assert exc.__cause__ is not None
        return exc.__cause__
    return exc


def _b64md5(md5_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")


class _PartBody(io.BytesIO):
    """A part's bytes as a file-like body, sharing them instead of copying them.

    botocore turns a ``bytes`` Body into ``io.BytesIO`` (which shares the bytes), then aiohttp
    sizes that with ``getbuffer()``, which makes the BytesIO copy them: a second copy of every
    in-flight part. Here ``getbuffer()`` is a read-only view of the same bytes.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._data = data

    def getbuffer(self) -> memoryview:
        return memoryview(self._data)


class S3Storage:
    """A bucket and prefix (``s3://bucket/prefix``) on S3 or an S3-compatible server."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        min_part_size: int = MIN_PART_SIZE,
        request_timeout: float | None = None,
    ) -> None:
        """``request_timeout``: seconds each request may take before it is cancelled (None: no
        deadline but the client's connect and read timeouts).

        ``storage_options["checksum"]`` (ours, not passed to s3fs): ``"auto"`` (default) declares
        CRC32C and keeps it where the remote answers with it, else MD5 alone; ``"crc32c"``
        requires it (a remote that ignores it is an error); ``"md5"`` never sends it."""
        scheme, _, rest = url.partition("://")
        if scheme not in ("s3", "s3a") or not rest or rest.startswith("/"):
            raise UsageError(f"{url!r} is not an S3 URL; use s3://bucket/prefix")
        if "@" in rest.split("/", 1)[0]:
            raise UsageError(
                "put S3 credentials in storage options (key, secret), not in the remote URL"
            )
        bucket, _, prefix = rest.partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._min_part_size = min_part_size
        options = dict(storage_options or {})
        mode = str(options.pop("checksum", None) or "auto").lower()
        if mode not in CHECKSUM_MODES:
            raise UsageError(
                f"storage option checksum={mode!r} is not one of {', '.join(CHECKSUM_MODES)}"
            )
        self.checksum_mode = mode
        #: Whether the remote keeps CRC32C checksums: None until it answered a request that
        #: declared it (auto), then what it answered. Learned once per instance.
        self._crc32c: bool | None = {"auto": None, "crc32c": True, "md5": False}[mode]
        options["skip_instance_cache"] = True
        # Every part and PUT carries Content-MD5 (checked by the server) and we compare the
        # returned ETag with our MD5: botocore's extra CRC32 trailers would only add CPU work on
        # s3fs's single event-loop thread. A user's own config_kwargs win.
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        # No SHA-256 of every body for the signature: the body's MD5 goes in the signed
        # Content-MD5 header, which the server checks (botocore itself does the same over https).
        s3_config = dict(config.get("s3") or {})
        s3_config.setdefault("payload_signing_enabled", False)
        config["s3"] = s3_config
        # One HTTP attempt per call: our retry layer counts the attempts (nested botocore retries
        # would multiply them and keep retrying after our deadline). A user's mode is kept.
        retries = {k: v for k, v in dict(config.get("retries") or {}).items() if k == "mode"}
        retries["total_max_attempts"] = 1
        config["retries"] = retries
        options["config_kwargs"] = config
        self.fs = s3fs.S3FileSystem(**options)
        self.fs.retries = 1  # one attempt per call: RetryingStorage decides about retries
        self.request_timeout = request_timeout
        self._probe_lock = threading.Lock()
        self._conditional_delete: bool | None = None
        #: Whether If-None-Match is honoured on PutObject / CompleteMultipartUpload: probed once.
        self._conditional_put: bool | None = None
        self._conditional_complete: bool | None = None
        self._write_probe_lock = threading.Lock()

    # --- helpers ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def min_part_size(self) -> int:
        return self._min_part_size

    def check_key(self, key: str) -> None:
        """S3 counts a key from the bucket: prefix + ``/`` + key must be <= 1024 UTF-8 bytes."""
        check_full_length(key, self.prefix, f"bucket {self.bucket!r}")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        if self.prefix and full.startswith(self.prefix + "/"):
            return full[len(self.prefix) + 1 :]
        return full

    def _raise(self, exc: BaseException, op: str, key: str | None) -> NoReturn:
        original = _client_error(exc)
        err = translate(original, op=op, bucket=self.bucket, key=key)
        if err is None:
            raise exc
        if err is original:
            raise err
        from uploader.errors import AccessDeniedError

        if isinstance(err, AccessDeniedError):
            raise err from None  # the cause may carry credentials
        raise err from exc

    def _bounded(self, op: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make()`` on s3fs's loop; at the deadline cancel it and await the cancellation."""
        timeout = self.request_timeout

        async def run() -> T:
            if timeout is None:
                return await make()
            async with asyncio.timeout(timeout):
                return await make()

        try:
            result: T = sync(self.fs.loop, run)
        except TimeoutError as exc:
            # asyncio.timeout raises only once the cancelled request has unwound (its connection
            # closed): nothing of this attempt is still being sent.
            limit = f"within {timeout:g} s" if timeout is not None else "in time"
            raise StorageTimeoutError(
                f"{op} in {self.bucket!r}: no answer {limit}; the request was cancelled and "
                "its cancellation awaited"
            ) from exc
        return result

    def _request(self, op: str, **kwargs: Any) -> Any:
        """One raw S3 request (no retries), cut at ``request_timeout``."""
        return self._bounded(op, lambda: self.fs._call_s3(op, **kwargs))

    def _call(self, op: str, key: str | None, **kwargs: Any) -> Any:
        try:
            return self._request(op, **kwargs)
        except Exception as exc:
            self._raise(exc, op, key)

    def _upload_known(self, key: str, upload_id: str) -> bool:
        """Whether the remote still lists ``upload_id`` for ``key``."""
        return any(u.upload_id == upload_id for u in self._list_uploads(self._key(key)))

    def _maybe_known(self, key: str, upload_id: str) -> bool:
        """Whether ``upload_id`` may still exist: listed, or the listing cannot be made (a
        remote without ListMultipartUploads proves nothing: the 5xx stays a server error)."""
        try:
            return self._upload_known(key, upload_id)
        except UnsupportedOperationError:
            return True

    def _call_upload(self, op: str, key: str, upload_id: str, **kwargs: Any) -> Any:
        """A call naming an upload id: an unknown id becomes NoSuchUploadError whatever the status
        (see the module's docstring for how servers say it)."""
        try:
            return self._request(op, **kwargs)
        except Exception as exc:
            code, status = client_error_code(_client_error(exc))
            if is_unsupported(code, status):
                self._raise(exc, op, key)  # 405/501: not implemented, whatever the upload is
            if code in UNKNOWN_UPLOAD_CODES or (
                status is not None and status >= 500 and not self._maybe_known(key, upload_id)
            ):
                raise NoSuchUploadError(
                    f"{op} of {key!r} in {self.bucket!r}: upload {upload_id} is unknown "
                    "(aborted or completed)"
                ) from None
            self._raise(exc, op, key)

    # --- the Storage protocol -------------------------------------------------------------------------

    def start_upload(self, key: str, metadata: Mapping[str, str] | None = None) -> str:
        declare = self._crc32c is not False
        extra: dict[str, Any] = {"ChecksumAlgorithm": "CRC32C"} if declare else {}
        out = self._call(
            "create_multipart_upload",
            key,
            Bucket=self.bucket,
            Key=self._key(key),
            Metadata=dict(metadata or {}),
            **extra,
        )
        if declare:
            # A remote that keeps additional checksums names the algorithm back (AWS, moto);
            # one that ignores the header (Ceph RGW 16) does not.
            echoed = str(out.get("ChecksumAlgorithm") or "").upper() == "CRC32C"
            self._learn_crc32c(echoed, "create_multipart_upload", key)
        return str(out["UploadId"])

    def _learn_crc32c(self, supported: bool, op: str, key: str) -> None:
        """What a request that declared CRC32C learned about the remote (once per instance)."""
        if supported:
            if self._crc32c is None:
                self._crc32c = True
            return
        if self.checksum_mode == "crc32c":
            raise StorageError(
                f"{op} of {key!r} in {self.bucket!r}: the remote did not answer with the CRC32C "
                "checksum it was asked to keep (it does not support additional checksums); use "
                "the storage option checksum='md5' (or 'auto') for this remote",
                retryable=False,
            )
        self._crc32c = False  # MD5 alone from now on: Content-MD5 and the ETags, as before

    @property
    def crc32c(self) -> bool | None:
        """Whether the remote keeps CRC32C checksums (None: not learned yet)."""
        return self._crc32c

    def upload_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartRef:
        check_part_number(key, number)
        check_part_size(key, number, payload.size)
        out = self._call_upload(
            "upload_part",
            key,
            upload_id,
            Bucket=self.bucket,
            Key=self._key(key),
            UploadId=upload_id,
            PartNumber=number,
            Body=_PartBody(payload.data),
            ContentMD5=_b64md5(payload.md5),
            # Sent while the remote may keep it (also before this instance learned it: an
            # upload started with CRC32C declared needs every part's), checked by the remote.
            # With the algorithm named too, as AWS's SDKs send it: servers then echo the
            # checksum they computed (moto only does then), which proves an SSE-KMS part.
            **(
                {"ChecksumCRC32C": crc32c_b64(payload.crc32c), "ChecksumAlgorithm": "CRC32C"}
                if self._crc32c is not False
                else {}
            ),
        )
        etag = normalize_etag(out.get("ETag"))
        echoed = out.get("ChecksumCRC32C")
        if echoed and echoed != crc32c_b64(payload.crc32c):
            raise StorageError(
                f"upload_part of {key!r} part {number}: the remote acknowledged CRC32C {echoed}, "
                f"expected the part's {crc32c_b64(payload.crc32c)}",
                retryable=True,
            )
        if etag != payload.md5 and etag and echoed == crc32c_b64(payload.crc32c):
            # SSE-KMS: the part's ETag is no MD5 of its bytes, but the remote echoed the CRC32C
            # of the bytes it received, equal to ours. Recorded with that ETag (complete needs
            # it), marked as proven by the checksum.
            return PartRef(number=number, etag=etag, size=payload.size, proven_by_checksum=True)
        if etag != payload.md5:
            # The body was damaged on the way (or the server computes ETags differently and
            # proved nothing else): the part is not known to be what we recorded, so it must
            # not count as uploaded.
            raise StorageError(
                f"upload_part of {key!r} part {number}: the remote acknowledged ETag {etag}, "
                f"expected the part's MD5 {payload.md5}",
                retryable=True,
            )
        return PartRef(number=number, etag=etag, size=payload.size)

    def list_parts(self, key: str, upload_id: str) -> list[PartRef]:
        parts: list[PartRef] = []
        marker = 0
        while True:
            out = self._call_upload(
                "list_parts",
                key,
                upload_id,
                Bucket=self.bucket,
                Key=self._key(key),
                UploadId=upload_id,
                PartNumberMarker=marker,
                MaxParts=1000,
            )
            for p in out.get("Parts", []):
                parts.append(
                    PartRef(
                        number=int(p["PartNumber"]),
                        etag=normalize_etag(p.get("ETag")) or "",
                        size=int(p.get("Size", -1)),
                    )
                )
            if not out.get("IsTruncated"):
                break
            next_marker = int(out.get("NextPartNumberMarker") or 0)
            if next_marker <= marker:
                break  # a server that does not page properly: what we have is all we get
            marker = next_marker
        return sorted({p.number: p for p in parts}.values(), key=lambda p: p.number)

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[PartRef],
        expected: Expected | None = None,
    ) -> ObjectInfo:
        check_parts(key, parts, self._min_part_size)
        if not self.conditional_complete():
            # Checked first where the remote ignores If-None-Match on complete (Ceph RGW): it
            # would replace an object there with ours.
            existing = self.head(key)
            if existing is not None:
                if matches(existing, expected):
                    return existing
                raise ObjectExistsError(
                    f"complete of {key!r} in {self.bucket!r}: an object already exists at the key "
                    f"({existing.size} bytes, etag {existing.etag}); refusing to overwrite it"
                )
        try:
            self._complete_call(key, upload_id, parts)
        except (NoSuchUploadError, ObjectExistsError):
            # Completed before (response lost) or by someone else: accept only our object.
            info = self.head(key)
            if matches(info, expected):
                assert info is not None
                return info
            raise
        # The one HEAD of a multipart upload: the object's size, ETag and checksum (Ceph RGW
        # answers Complete with an empty ETag; moto's answer has no checksum).
        info = self.head(key)
        if info is None:
            raise StorageError(
                f"complete of {key!r} in {self.bucket!r}: acknowledged but no object is visible",
                retryable=True,
            )
        return info

    def _complete_call(self, key: str, upload_id: str, parts: Sequence[PartRef]) -> None:
        def listed(with_crc: bool) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for p in parts:
                item: dict[str, Any] = {"PartNumber": p.number, "ETag": f'"{p.etag}"'}
                if with_crc and p.crc32c is not None:
                    item["ChecksumCRC32C"] = crc32c_b64(p.crc32c)
                out.append(item)
            return out

        def call(with_crc: bool) -> None:
            self._call_upload(
                "complete_multipart_upload",
                key,
                upload_id,
                Bucket=self.bucket,
                Key=self._key(key),
                UploadId=upload_id,
                MultipartUpload={"Parts": listed(with_crc)},
                IfNoneMatch="*",
            )

        # Also while not learned yet (a resumed upload in a fresh process): an upload started
        # with CRC32C declared must be completed with its parts' checksums.
        with_crc = self._crc32c is not False and all(p.crc32c is not None for p in parts)
        if not with_crc:
            call(False)
            return
        try:
            call(True)
        except StorageError as exc:
            cause = exc.__cause__
            code = client_error_code(_client_error(cause))[0] if cause is not None else None
            if exc.retryable or code not in CHECKSUM_REFUSED_CODES:
                raise
            # An upload started without CRC32C declared (by an earlier version, or before this
            # instance learned the remote keeps it) is refused with part checksums; Ceph RGW
            # refuses them on every upload (InvalidPart). Once more with the ETags alone.
            call(False)

    def abort(self, key: str, upload_id: str) -> None:
        try:
            self._call_upload(
                "abort_multipart_upload",
                key,
                upload_id,
                Bucket=self.bucket,
                Key=self._key(key),
                UploadId=upload_id,
            )
        except NoSuchUploadError:
            return

    def put(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        expected = Expected(size=payload.size, etag=payload.md5)
        conditional = self.conditional_put()
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
        crc = crc32c_b64(payload.crc32c)
        extra: dict[str, Any] = (
            {"ChecksumAlgorithm": "CRC32C", "ChecksumCRC32C": crc} if declare else {}
        )
        try:
            out = self._call(
                "put_object",
                key,
                Bucket=self.bucket,
                Key=self._key(key),
                Body=_PartBody(payload.data),
                ContentMD5=_b64md5(payload.md5),
                Metadata=dict(metadata or {}),
                IfNoneMatch="*",
                **extra,
            )
        except ObjectExistsError:
            info = self.head(key)
            if matches(info, expected):
                assert info is not None
                return info
            raise
        # The server checked the body against Content-MD5. Its ETag may still not be the MD5
        # (SSE-KMS, SSE-C): returned as said; the caller proves the object by reading it back
        # when the ETag does not prove it (see uploader.plan).
        etag = normalize_etag(out.get("ETag"))
        echoed = out.get("ChecksumCRC32C")
        if declare:
            self._learn_crc32c(bool(echoed), "put_object", key)
        # Proven by its own response: no object was replaced (the remote honours the condition)
        # and the remote checksummed exactly our bytes. Anything less: the caller HEADs.
        proven = conditional and echoed == crc
        return ObjectInfo(
            key=key, size=payload.size, etag=etag, checksum=echoed or None, proven=proven
        )

    def head(self, key: str) -> ObjectInfo | None:
        found = self.head_metadata(key)
        return None if found is None else found[0]

    def head_metadata(self, key: str) -> tuple[ObjectInfo, dict[str, str]] | None:
        extra: dict[str, Any] = {"ChecksumMode": "ENABLED"} if self._crc32c is not False else {}
        try:
            out = self._request("head_object", Bucket=self.bucket, Key=self._key(key), **extra)
        except Exception as exc:
            code, status = client_error_code(_client_error(exc))
            if code == "NoSuchBucket":
                self._raise(exc, "head_object", key)
            if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                return None
            if isinstance(exc, FileNotFoundError) and not code:
                return None
            self._raise(exc, "head_object", key)
        info = ObjectInfo(
            key=key,
            size=int(out["ContentLength"]),
            etag=normalize_etag(out.get("ETag")),
            checksum=out.get("ChecksumCRC32C") or None,
        )
        return info, {str(k).lower(): str(v) for k, v in (out.get("Metadata") or {}).items()}

    def list_objects(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        keys: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        while True:
            out = self._call("list_objects_v2", None, **kwargs)
            for item in out.get("Contents", []):
                rel = self._rel(str(item["Key"]))
                if rel.startswith(HIDDEN_PREFIX) or (self.prefix and rel == item["Key"]):
                    continue
                keys.append(rel)
            token = out.get("NextContinuationToken")
            if not out.get("IsTruncated") or not token:
                break
            kwargs["ContinuationToken"] = token
        return sorted(keys)

    def write_hidden(self, name: str, data: bytes) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        key = f"{HIDDEN_PREFIX}{name}"
        self._call(
            "put_object",
            key,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ContentMD5=_b64md5(md5),
        )

    def read_hidden(self, name: str) -> bytes | None:
        key = f"{HIDDEN_PREFIX}{name}"
        info = self.head(key)
        return None if info is None else self.read(key, 0, info.size)

    def read(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        fs = self.fs
        full = self._key(key)

        async def get() -> bytes:
            # The request and the reading of its body under one deadline.
            out = await fs._call_s3(
                "get_object", Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}"
            )
            async with out["Body"] as body:
                data: bytes = await body.read()
                return data

        try:
            return self._bounded("get_object", get)
        except Exception as exc:
            self._raise(exc, "get_object", key)

    def _list_uploads(self, full_prefix: str) -> list[UploadRef]:
        uploads: list[UploadRef] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
        while True:
            out = self._call("list_multipart_uploads", None, **kwargs)
            for u in out.get("Uploads", []):
                initiated = u.get("Initiated")
                if initiated is not None and initiated.tzinfo is not None:
                    initiated = initiated.astimezone(UTC).replace(tzinfo=None)
                uploads.append(
                    UploadRef(key=self._rel(u["Key"]), upload_id=u["UploadId"], initiated=initiated)
                )
            if not out.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = out.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = out.get("NextUploadIdMarker")
            if not kwargs["KeyMarker"] and not kwargs["UploadIdMarker"]:
                break
        return uploads

    def list_uploads(self, prefix: str = "") -> list[UploadRef]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        return self._list_uploads(full)

    def delete_if_match(self, key: str, etag: str) -> None:
        want = normalize_etag(etag) or ""
        try:
            self._request(
                "delete_object", Bucket=self.bucket, Key=self._key(key), IfMatch=f'"{want}"'
            )
        except Exception as exc:
            code, status = client_error_code(_client_error(exc))
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return  # nothing at the key: nothing to do
            if code == "PreconditionFailed" or status == 412:
                found = self.head(key)
                if found is None:
                    return  # some servers answer 412 for an absent key
                raise PreconditionFailedError(
                    key, want, found.etag, where=f"delete_object in {self.bucket!r}"
                ) from None
            self._raise(exc, "delete_object", key)

    def conditional_delete(self) -> bool:
        """Whether this server honours ``If-Match`` on DeleteObject: probed once, then cached.

        The probe PUTs a tiny object under ``.uploader/probe/<uuid>``, asks to delete it with a
        wrong ETag (the server must refuse with 412 and keep it), then with the right one (it must
        be gone). Any other behaviour: False. The probe object is removed in every case. A
        transport failure raises (and nothing is cached): a network blip proves nothing.
        """
        with self._probe_lock:
            if self._conditional_delete is None:
                self._conditional_delete = self._probe_conditional_delete()
            return self._conditional_delete

    def conditional_put(self) -> bool:
        """Whether this server honours ``If-None-Match: *`` on PutObject: probed once."""
        with self._write_probe_lock:
            if self._conditional_put is None:
                self._conditional_put = self._probe_conditional_write("put")
            return self._conditional_put

    def conditional_complete(self) -> bool:
        """Whether this server honours ``If-None-Match: *`` on CompleteMultipartUpload (Ceph
        RGW 16 does not): probed once."""
        with self._write_probe_lock:
            if self._conditional_complete is None:
                self._conditional_complete = self._probe_conditional_write("complete")
            return self._conditional_complete

    def _probe_conditional_write(self, op: str) -> bool:
        """Write a probe object under ``.uploader/probe/<uuid>``, then try to replace it with a
        conditional PUT (or a conditional Complete of a one-part upload): honoured only if the
        remote refuses (412) and the first object stays. Anything else: False, and the caller
        HEADs before every such write, as before. The probe's upload and object are removed; a
        transport failure raises (nothing cached)."""
        key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
        first = f"segment-uploader conditional {op} probe {key}".encode()
        md5 = hashlib.md5(first, usedforsecurity=False).hexdigest()
        second = first + b": a second body that must not replace the first"
        md5_2 = hashlib.md5(second, usedforsecurity=False).hexdigest()
        where = {"Bucket": self.bucket, "Key": self._key(key)}
        self._call("put_object", key, Body=first, ContentMD5=_b64md5(md5), **where)
        try:
            try:
                if op == "put":
                    self._call(
                        "put_object",
                        key,
                        Body=second,
                        ContentMD5=_b64md5(md5_2),
                        IfNoneMatch="*",
                        **where,
                    )
                else:
                    self._probe_complete(key, second, md5_2, where)
                honoured = False  # accepted: the first object was replaced
            except ObjectExistsError:
                honoured = True
            except StorageError as exc:
                if exc.retryable:
                    raise
                honoured = False  # the remote refuses the condition outright
            if honoured:
                found = self.head(key)
                honoured = found is not None and found.size == len(first)
            return honoured
        finally:
            # Our own probe object, named by a fresh uuid: removed by the ETag it has now. A
            # failure here leaves a tiny hidden object and changes nothing that was learned.
            with contextlib.suppress(StorageError):
                found = self.head(key)
                if found is not None and found.etag:
                    self.delete_if_match(key, found.etag)

    def _probe_complete(self, key: str, body: bytes, md5: str, where: dict[str, Any]) -> None:
        upload_id = str(self._call("create_multipart_upload", key, **where)["UploadId"])
        try:
            part = self._call_upload(
                "upload_part",
                key,
                upload_id,
                UploadId=upload_id,
                PartNumber=1,
                Body=body,
                ContentMD5=_b64md5(md5),
                **where,
            )
            self._call_upload(
                "complete_multipart_upload",
                key,
                upload_id,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
                IfNoneMatch="*",
                **where,
            )
        finally:
            with contextlib.suppress(StorageError):  # gone if completed; s3rver refuses aborts
                self._call_upload(
                    "abort_multipart_upload", key, upload_id, UploadId=upload_id, **where
                )

    def _probe_conditional_delete(self) -> bool:
        key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
        body = f"segment-uploader conditional delete probe {key}".encode()
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
        wrong = "0" * 32 if md5 != "0" * 32 else "1" * 32
        self._call(
            "put_object",
            key,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=body,
            ContentMD5=_b64md5(md5),
        )
        failed = True
        try:
            try:
                self.delete_if_match(key, wrong)
                refused = False  # accepted: either ignored the condition or deleted anyway
            except PreconditionFailedError:
                refused = True
            except StorageError as exc:
                if exc.retryable:
                    raise
                refused = False  # the server rejects conditional deletes outright
            honoured = refused and self.head(key) is not None
            if honoured:
                self.delete_if_match(key, md5)
                honoured = self.head(key) is None
            failed = False
            return honoured
        finally:
            # Our own probe object, named by a fresh uuid: removed by its ETag, whatever the
            # server does with the condition (if it ignored it, the object is already gone).
            try:
                if self.head(key) is not None:
                    self.delete_if_match(key, md5)
            except StorageError:
                if not failed:
                    raise

    def close(self) -> None:
        """Nothing to do: s3fs closes its session when the filesystem object is collected."""
