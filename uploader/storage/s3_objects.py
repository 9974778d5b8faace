"""Objects of :class:`uploader.storage.s3.S3Storage`: HEAD, read, list, hidden records, the one
conditional delete, and the probes of what the remote honours.

Probes. Whether the remote honours ``If-None-Match`` on PutObject and on Complete, and ``If-Match``
on DeleteObject, is probed once per instance (see :mod:`uploader.storage.s3` for what it saves).

Conditional delete. ``delete_if_match`` sends ``If-Match``. Servers that ignore the header (some
Ceph RGW versions, older MinIO, s3rver) would delete anything: :meth:`S3Storage.conditional_delete`
proves the behaviour once per instance with a probe object under ``.uploader/probe/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from uploader.digest import crc32c_b64, crc32c_of, normalize_etag
from uploader.errors import ObjectExistsError, PreconditionFailedError, StorageError
from uploader.storage.base import ObjectInfo
from uploader.storage.errors_map import client_error_code
from uploader.storage.s3_requests import (
    CRC32C_PROBE,
    HIDDEN_PREFIX,
    PROBE_PREFIX,
    S3Requests,
    _b64md5,
    _client_error,
)

log = logging.getLogger("uploader")


class S3Objects(S3Requests):
    """HEAD, read, list and delete objects; the conditional-write and -delete probes."""

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

    def _listed(self, full: str, **extra: Any) -> Iterator[str]:
        """Every key ListObjectsV2 gives under the full prefix ``full``, page after page."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, **extra}
        while True:
            out = self._call("list_objects_v2", None, **kwargs)
            for item in out.get("Contents", []):
                yield str(item["Key"])
            token = out.get("NextContinuationToken")
            if not out.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    def list_objects(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        keys: list[str] = []
        for key in self._listed(full):
            rel = self._rel(key)
            if rel.startswith(HIDDEN_PREFIX) or (self.prefix and rel == key):
                continue
            keys.append(rel)
        return sorted(keys)

    def _put_small(self, key: str, body: bytes, **extra: Any) -> Any:
        """One plain PUT of a small body of our own (a record, a probe), its MD5 checked by the
        remote (``Content-MD5``)."""
        md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
        return self._call(
            "put_object",
            key,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=body,
            ContentMD5=_b64md5(md5),
            **extra,
        )

    def write_hidden(self, name: str, data: bytes) -> None:
        self._put_small(f"{HIDDEN_PREFIX}{name}", data)

    def read_hidden(self, name: str) -> bytes | None:
        key = f"{HIDDEN_PREFIX}{name}"
        info = self.head(key)
        return None if info is None else self.read(key, 0, info.size)

    def list_hidden(self, prefix: str) -> list[str]:
        hidden = self._key(HIDDEN_PREFIX)
        full = self._key(f"{HIDDEN_PREFIX}{prefix}")
        return sorted(key[len(hidden) :] for key in self._listed(full, Delimiter="/"))

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
        with self._complete_probe_lock:
            if self._conditional_complete is None:
                self._conditional_complete = self._probe_conditional_write("complete")
            return self._conditional_complete

    def prepare_complete(self) -> None:
        """Start learning whether Complete honours If-None-Match (a probe of several requests)
        on a thread of its own, so that the first Complete does not wait for it: a store calls
        this when it starts an upload, and the probe runs while the parts are sent. A probe that
        fails learns nothing; Complete probes again. Its probe object and upload exist (under
        ``.uploader/probe/``) while it runs."""

        def learn() -> None:
            try:
                self.conditional_complete()
            except StorageError as exc:
                log.debug("probing conditional complete on %s: %s", self.url, exc)

        with self._complete_probe_start:
            if self._conditional_complete is not None or self._complete_probe is not None:
                return
            self._complete_probe = threading.Thread(
                target=learn, name="uploader-complete-probe", daemon=True
            )
        self._complete_probe.start()

    def close(self) -> None:
        """Let a background probe finish (it removes its own object and upload, which a sweep
        does not list), waiting at most a few request deadlines; s3fs closes its session when
        the filesystem object is collected."""
        self._probe_ended()

    def _probe_ended(self) -> None:
        """Wait (a few request deadlines at most) for this instance's background probe."""
        probe = self._complete_probe
        if probe is not None and probe.is_alive():
            probe.join(timeout=3 * (self.request_timeout or 10.0))

    def keeps_crc32c(self) -> bool:
        """Whether this remote keeps and echoes CRC32C checksums: what lets a store run new
        segments in the crc32c checksum mode (no MD5). Learned once per instance, and recorded
        at the remote for other processes (see :meth:`_probe_crc32c`)."""
        with self._write_probe_lock:
            if self._crc32c_kept is None:
                self._crc32c_kept = self._crc32c is not False and self._probe_crc32c()
            return self._crc32c_kept

    def _probe_crc32c(self) -> bool:
        """The record is the hidden object ``.uploader/probe/crc32c`` itself: one HEAD that
        reports its CRC32C proves again, in every new process, that the remote keeps it (a remote
        that keeps none cannot report one). Otherwise it is written with its CRC32C declared: the
        PUT must echo it and a HEAD must report it. A transport failure raises (nothing learned)."""
        key = CRC32C_PROBE
        body = b"segment-uploader: this remote keeps the CRC32C of this object\n"
        crc = crc32c_b64(crc32c_of(body))
        found = self.head(key)  # with ChecksumMode: the CRC32C where the remote keeps it
        if found is not None and found.size == len(body) and found.checksum == crc:
            return True
        out = self._put_small(key, body, ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc)
        kept = bool(out.get("ChecksumCRC32C") == crc)
        if kept:
            found = self.head(key)
            kept = found is not None and found.checksum == crc
        self._learn_crc32c(kept, "put_object", key)  # the option checksum='crc32c': an error
        return kept

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
        self._put_small(key, body)
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
