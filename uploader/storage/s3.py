"""S3 through s3fs's raw calls: native multipart uploads whose ids and ETags we keep.

s3fs's file objects keep the upload id and part ETags in memory only, so they cannot resume after
a crash (and ``fs.open(..., "wb")`` completes the upload even on an exception). Here every call is
one S3 request through s3fs's ``_call_s3`` and its answer goes back to the caller for the manifest.

What we check ourselves because S3-compatible servers (moto among them) may not:

* each part is sent with ``Content-MD5`` and the returned ETag must equal our MD5;
* each part's body is streamed from the local file and its CRC32C re-computed as it is sent
  (:mod:`uploader.part_stream`): bytes rewritten since their checksums were taken never make a
  whole request, whether or not the server checks ``Content-MD5``;
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
alone, as before. The storage option ``checksum`` (``auto``, ``crc32c``, ``md5``) sets it.

A payload without an MD5 is a segment in the store's crc32c checksum mode (see
:class:`uploader.config.ChecksumMode`): no ``Content-MD5``; the body's CRC32C is taken again
before it goes (moto echoes any header), the part counts only with that CRC32C echoed, and a PUT
is expected to report it (:attr:`Expected.parts`). ``keeps_crc32c`` (in
:mod:`uploader.storage.s3_objects`) tells a store whether new segments may use that mode.

Requests. Whether the remote honours ``If-None-Match`` on PutObject and on Complete is probed
once per instance (``.uploader/probe/``: a conditional second write must get 412; the Complete
probe runs in the background from a store's first upload, ``prepare_complete``). Where honoured,
no HEAD precedes the write: a multipart upload costs one HEAD (after Complete), a PUT whose
response echoes our CRC32C, or whose ETag is our MD5, none (:attr:`ObjectInfo.proven`).

The PUTs (``put``, and ``put_many``: a batch as coroutines) are :mod:`uploader.storage.s3_put`.
The request layer (errors, deadlines, unknown upload ids) is :mod:`uploader.storage.s3_requests`;
HEAD, reads, listings, the conditional delete and the probes are :mod:`uploader.storage.s3_objects`
(this class's bases).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from uploader.digest import (
    Payload,
    check_body_crc32c,
    crc32c_b64,
    crc32c_from_b64,
    normalize_etag,
)
from uploader.errors import NoSuchUploadError, ObjectExistsError, StorageError
from uploader.storage.base import Expected, ObjectInfo, PartRef, UploadRef
from uploader.storage.errors_map import client_error_code
from uploader.storage.rules import check_part_number, check_part_size, check_parts, matches
from uploader.storage.s3_put import S3Puts, _body
from uploader.storage.s3_requests import (
    CHECKSUM_MODES,
    CHECKSUM_REFUSED_CODES,
    HIDDEN_PREFIX,
    PROBE_PREFIX,
    UNKNOWN_UPLOAD_CODES,
    _b64md5,
    _client_error,
    _PartBody,
)

# Imported from here (tests/storage/test_part_body.py, tests/limited_s3.py's docs).
__all__ = [
    "CHECKSUM_MODES",
    "CHECKSUM_REFUSED_CODES",
    "HIDDEN_PREFIX",
    "PROBE_PREFIX",
    "UNKNOWN_UPLOAD_CODES",
    "S3Storage",
    "_PartBody",
]


class S3Storage(S3Puts):
    """A bucket and prefix (``s3://bucket/prefix``) on S3 or an S3-compatible server."""

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

    def upload_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartRef:
        check_part_number(key, number)
        check_part_size(key, number, payload.size)
        if payload.md5 is None:
            return self._upload_part_crc32c(key, upload_id, number, payload)
        out = self._send_part(
            key,
            upload_id,
            number,
            payload,
            ContentMD5=_b64md5(payload.md5),
            # Sent while the remote may keep it (also before this instance learned it: an upload
            # started with CRC32C declared needs every part's), checked by the remote. With the
            # algorithm named too, as AWS's SDKs send it: servers then echo the checksum they
            # computed (moto only does then), which proves an SSE-KMS part.
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

    def _send_part(
        self, key: str, upload_id: str, number: int, payload: Payload, **checksums: Any
    ) -> Any:
        """The UploadPart request of either mode, its body held or streamed (see ``_body``)."""
        with _body(payload, key, number) as body:
            return self._call_upload(
                "upload_part",
                key,
                upload_id,
                Bucket=self.bucket,
                Key=self._key(key),
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                **checksums,
            )

    def _upload_part_crc32c(
        self, key: str, upload_id: str, number: int, payload: Payload
    ) -> PartRef:
        """A part of a segment in the crc32c mode: no MD5, so no Content-MD5 and no ETag to
        compare. The remote must echo the part's CRC32C (which it checks against the body where it
        keeps checksums); the body's CRC32C is taken again here first, since a server that does not
        check (moto) would echo the header whatever the bytes."""
        crc = crc32c_b64(payload.crc32c)
        self._require_crc32c("upload_part", key)
        check_body_crc32c("upload_part", key, number, payload)
        out = self._send_part(
            key, upload_id, number, payload, ChecksumCRC32C=crc, ChecksumAlgorithm="CRC32C"
        )
        etag = normalize_etag(out.get("ETag"))
        echoed = out.get("ChecksumCRC32C")
        if echoed != crc or not etag:
            # Not proven: the part must not count as uploaded. A remote that keeps no checksum
            # (or stopped echoing it) cannot prove a crc32c-mode part at all.
            raise StorageError(
                f"upload_part of {key!r} part {number}: the remote acknowledged CRC32C "
                f"{echoed or 'none'} (ETag {etag or 'none'}), expected the part's {crc}",
                retryable=bool(echoed),
            )
        return PartRef(
            number=number,
            etag=etag,
            size=payload.size,
            crc32c=payload.crc32c,
            proven_by_checksum=True,
        )

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
                        # What a crc32c-mode part is reused by (with its size): the checksum the
                        # remote keeps for it, where it keeps one.
                        crc32c=crc32c_from_b64(p.get("ChecksumCRC32C")),
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

    def probe_uploads(self) -> list[UploadRef]:
        """The unfinished uploads of capability probes (under ``.uploader/probe/``), which
        :meth:`list_uploads` never lists: a probe aborts its own within seconds, so an old one
        was left by a process killed mid-probe (the sweep aborts it). This instance's own
        background probe is waited for first: its upload is never among them."""
        self._probe_ended()
        return self._list_uploads(self._key(PROBE_PREFIX + "/"))

    def list_uploads(self, prefix: str = "") -> list[UploadRef]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        return self._list_uploads(full, probes=False)
