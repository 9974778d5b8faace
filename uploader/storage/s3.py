"""S3 through s3fs's raw calls: native multipart uploads whose ids and ETags we keep.

s3fs's file objects keep the upload id and part ETags in memory only, so they cannot resume after
a crash (and ``fs.open(..., "wb")`` completes the upload even on an exception). Here every call is
one S3 request through ``fs.call_s3`` and its answer goes back to the caller for the manifest.

What we check ourselves because S3-compatible servers (moto among them) may not:

* each part is sent with ``Content-MD5`` and the returned ETag must equal our MD5;
* the part rules (sizes, count, ascending order) before ``complete``;
* ``complete`` and ``put`` are conditional (``If-None-Match: *``): an existing object is never
  overwritten; an object that matches what we expected (a lost response) is accepted.

Some servers answer HTTP 500 for an unknown or finished upload id instead of ``NoSuchUpload``:
before treating a 5xx as transient we ask ``ListMultipartUploads`` whether the id still exists.
s3fs's own retries are turned off (``retries = 1``): :mod:`uploader.storage.retry` owns retrying.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from datetime import UTC
from typing import Any, NoReturn

import s3fs

from uploader.digest import Payload, normalize_etag
from uploader.errors import (
    NoSuchUploadError,
    ObjectExistsError,
    StorageError,
    UsageError,
)
from uploader.storage.base import MIN_PART_SIZE, Expected, ObjectInfo, PartRef, UploadRef
from uploader.storage.errors_map import client_error_code, translate
from uploader.storage.rules import check_part_number, check_part_size, check_parts, matches


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
    ) -> None:
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
        options["config_kwargs"] = config
        self.fs = s3fs.S3FileSystem(**options)
        self.fs.retries = 1  # one attempt per call: RetryingStorage decides about retries

    # --- helpers ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def min_part_size(self) -> int:
        return self._min_part_size

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

    def _call(self, op: str, key: str | None, **kwargs: Any) -> Any:
        try:
            return self.fs.call_s3(op, **kwargs)
        except Exception as exc:
            self._raise(exc, op, key)

    def _upload_known(self, key: str, upload_id: str) -> bool:
        """Whether the remote still lists ``upload_id`` for ``key``."""
        return any(u.upload_id == upload_id for u in self._list_uploads(self._key(key)))

    def _call_upload(self, op: str, key: str, upload_id: str, **kwargs: Any) -> Any:
        """A call naming an upload id: an unknown id becomes NoSuchUploadError whatever the status."""
        try:
            return self.fs.call_s3(op, **kwargs)
        except Exception as exc:
            code, status = client_error_code(_client_error(exc))
            if code == "NoSuchUpload" or (
                status is not None and status >= 500 and not self._upload_known(key, upload_id)
            ):
                raise NoSuchUploadError(
                    f"{op} of {key!r} in {self.bucket!r}: upload {upload_id} is unknown "
                    "(aborted or completed)"
                ) from None
            self._raise(exc, op, key)

    # --- the Storage protocol -------------------------------------------------------------------------

    def start_upload(self, key: str) -> str:
        out = self._call("create_multipart_upload", key, Bucket=self.bucket, Key=self._key(key))
        return str(out["UploadId"])

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
        )
        etag = normalize_etag(out.get("ETag"))
        if etag != payload.md5:
            # The body was damaged on the way (or the server computes ETags differently): the
            # part is not what we recorded, so it must not count as uploaded.
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
        existing = self.head(key)
        if existing is not None:
            # Checked first as well: not every server honours If-None-Match on complete.
            if matches(existing, expected):
                return existing
            raise ObjectExistsError(
                f"complete of {key!r} in {self.bucket!r}: an object already exists at the key "
                f"({existing.size} bytes, etag {existing.etag}); refusing to overwrite it"
            )
        try:
            self._call_upload(
                "complete_multipart_upload",
                key,
                upload_id,
                Bucket=self.bucket,
                Key=self._key(key),
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [{"PartNumber": p.number, "ETag": f'"{p.etag}"'} for p in parts]
                },
                IfNoneMatch="*",
            )
        except (NoSuchUploadError, ObjectExistsError):
            # Completed before (response lost) or by someone else: accept only our object.
            info = self.head(key)
            if matches(info, expected):
                assert info is not None
                return info
            raise
        info = self.head(key)
        if info is None:
            raise StorageError(
                f"complete of {key!r} in {self.bucket!r}: acknowledged but no object is visible",
                retryable=True,
            )
        return info

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

    def put(self, key: str, payload: Payload) -> ObjectInfo:
        expected = Expected(size=payload.size, etag=payload.md5)
        try:
            out = self._call(
                "put_object",
                key,
                Bucket=self.bucket,
                Key=self._key(key),
                Body=_PartBody(payload.data),
                ContentMD5=_b64md5(payload.md5),
                IfNoneMatch="*",
            )
        except ObjectExistsError:
            info = self.head(key)
            if matches(info, expected):
                assert info is not None
                return info
            raise
        etag = normalize_etag(out.get("ETag"))
        if etag != payload.md5:
            raise StorageError(
                f"put of {key!r}: the remote acknowledged ETag {etag}, expected MD5 {payload.md5}",
                retryable=True,
            )
        return ObjectInfo(key=key, size=payload.size, etag=etag)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            out = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            code, status = client_error_code(_client_error(exc))
            if code == "NoSuchBucket":
                self._raise(exc, "head_object", key)
            if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                return None
            if isinstance(exc, FileNotFoundError) and not code:
                return None
            self._raise(exc, "head_object", key)
        return ObjectInfo(
            key=key, size=int(out["ContentLength"]), etag=normalize_etag(out.get("ETag"))
        )

    def read(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        out = self._call(
            "get_object",
            key,
            Bucket=self.bucket,
            Key=self._key(key),
            Range=f"bytes={start}-{end - 1}",
        )
        return _read_body(self.fs, out["Body"])

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

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Bucket=self.bucket, Key=self._key(key))

    def close(self) -> None:
        """Nothing to do: s3fs closes its session when the filesystem object is collected."""


def _read_body(fs: Any, body: Any) -> bytes:
    """Read an aiobotocore streaming body on s3fs's loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body:
            data: bytes = await body.read()
            return data

    result: bytes = sync(fs.loop, read)
    return result
