"""The Storage protocol's uploads on a staging area: parts staged by number, ``complete`` and
``put`` assembling and publishing, ``abort``.

A part is written to a temporary name and renamed into its upload; a part renamed into an upload
whose ``meta.json`` is gone (a stale writer after ``abort`` or ``complete``) is removed again and
refused with NoSuchUploadError (see :mod:`uploader.storage.staged.layout`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from uploader.digest import Payload, multipart_etag
from uploader.errors import (
    NoSuchUploadError,
    ObjectExistsError,
    PartRuleError,
    StorageError,
)
from uploader.part_stream import part_bytes
from uploader.storage.base import Expected, ObjectInfo, PartRef, UploadRef
from uploader.storage.rules import check_part_number, check_part_size, check_parts, matches
from uploader.storage.staged.layout import HIDDEN, fsync_dir
from uploader.storage.staged.publish import StagedPublish


class StagedParts(StagedPublish):
    """Multipart uploads staged under ``.uploader/uploads`` and single PUTs."""

    def start_upload(self, key: str, metadata: Mapping[str, str] | None = None) -> str:
        upload_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex}"
        meta = {
            "key": key,
            "initiated": datetime.now(UTC).replace(tzinfo=None).isoformat(),
            "metadata": dict(metadata or {}),
        }
        try:
            tmp = self._tmp()
            self._write_new(tmp, [json.dumps(meta).encode()])
            self._rename(tmp, self._meta_path(upload_id))
        except OSError as exc:
            raise self._fail(exc, "start_upload", key) from exc
        return upload_id

    def _meta(self, upload_id: str) -> dict[str, Any] | None:
        # cat_file, not open: parts of one upload are sent in parallel and each reads this, and
        # fsspec's memory:// hands every reader the same file object (one shared position: a
        # reader could get b"" and fail on the JSON; seen once in CI).
        try:
            meta: dict[str, Any] = json.loads(self.fs.cat_file(self._meta_path(upload_id)))
        except FileNotFoundError:
            return None
        return meta

    def _require(self, key: str, upload_id: str, op: str) -> None:
        meta = self._meta(upload_id)
        if meta is None or meta.get("key") != key:
            raise NoSuchUploadError(
                f"{op} of {key!r} under {self.url}: upload {upload_id} is unknown (aborted or completed)"
            )

    def _staged(self, upload_id: str) -> dict[int, tuple[int, str, str]]:
        """Part number -> (seq, md5, path) of the newest staged copy of each part."""
        newest: dict[int, tuple[int, str, str]] = {}
        self.fs.invalidate_cache()
        try:
            names = self.fs.ls(self._upload_dir(upload_id), detail=False)
        except FileNotFoundError:
            return {}
        for path in names:
            name = str(path).rstrip("/").rsplit("/", 1)[-1]
            bits = name.split(".")
            if len(bits) != 3 or not bits[0].isdigit() or not bits[1].isdigit():
                continue  # meta.json, temporary files
            number, seq, md5 = int(bits[0]), int(bits[1]), bits[2]
            if number not in newest or seq > newest[number][0]:
                newest[number] = (seq, md5, str(path))
        return newest

    def _stage_part(self, key: str, upload_id: str, tmp: str, final: str) -> None:
        """Rename a written part into its upload, never re-creating an upload that is gone."""
        gone = NoSuchUploadError(
            f"upload_part of {key!r} under {self.url}: upload {upload_id} is unknown "
            "(aborted or completed while the part was being written); nothing was kept"
        )
        meta = self._meta_path(upload_id)
        if self.local:
            try:
                os.rename(tmp, final)  # no makedirs: a removed upload stays removed
            except FileNotFoundError:
                self._remove(tmp)
                raise gone from None
            exists = os.path.exists(meta)
        else:
            self.fs.invalidate_cache()
            if not self.fs.exists(meta):
                self._remove(tmp)
                raise gone
            self.fs.mv(tmp, final)
            self.fs.invalidate_cache()
            exists = self.fs.exists(meta)
        if not exists:
            # Aborted or completed between the check and the rename: take the part back out.
            self._remove(final)
            with contextlib.suppress(OSError):
                if self.local:
                    os.rmdir(self._upload_dir(upload_id))
                else:
                    self.fs.rmdir(self._upload_dir(upload_id))
            raise gone
        if self.local:
            fsync_dir(self._upload_dir(upload_id))

    def upload_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartRef:
        check_part_number(key, number)
        check_part_size(key, number, payload.size)
        self._require(key, upload_id, "upload_part")
        _md5_required("upload_part", key, payload)
        # Whole, checked against the recorded CRC32C when read from the file: a staged part is
        # written in one piece (parts are bounded by the part size; S3 streams them instead).
        data = part_bytes(payload, key=key, number=number)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if md5 != payload.md5:
            raise StorageError(
                f"upload_part of {key!r} part {number}: the bytes do not match their recorded MD5",
                retryable=True,
            )
        final = f"{self._upload_dir(upload_id)}/{number:05d}.{time.time_ns()}.{md5}"
        try:
            tmp = self._tmp()
            self._write_new(tmp, [data])
            self._stage_part(key, upload_id, tmp, final)
            for _seq, _md5, path in [
                v for n, v in self._staged(upload_id).items() if n == number and v[2] != final
            ]:
                self._remove(path)
        except NoSuchUploadError:
            raise
        except OSError as exc:
            raise self._fail(exc, "upload_part", key) from exc
        return PartRef(number=number, etag=md5, size=payload.size)

    def list_parts(self, key: str, upload_id: str) -> list[PartRef]:
        self._require(key, upload_id, "list_parts")
        out = []
        for number, (_seq, md5, path) in sorted(self._staged(upload_id).items()):
            out.append(PartRef(number=number, etag=md5, size=int(self.fs.size(path))))
        return out

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[PartRef],
        expected: Expected | None = None,
    ) -> ObjectInfo:
        check_parts(key, parts, self._min_part_size)
        upload_meta = self._meta(upload_id)
        if upload_meta is None:
            info = self.head(key)
            if matches(info, expected):
                assert info is not None
                return info
            raise NoSuchUploadError(
                f"complete of {key!r} under {self.url}: upload {upload_id} is unknown "
                "(aborted or completed)"
            )
        self._require(key, upload_id, "complete")
        existing = self.head(key)
        if existing is not None:
            if matches(existing, expected):
                self.abort(key, upload_id)
                return existing
            raise ObjectExistsError(
                f"complete of {key!r} under {self.url}: an object already exists at the key "
                f"({existing.size} bytes); refusing to overwrite it"
            )
        staged = self._staged(upload_id)
        sources = []
        for p in parts:
            held = staged.get(p.number)
            if held is None or held[1] != p.etag:
                raise PartRuleError(
                    f"complete of {key!r}: part {p.number} with ETag {p.etag} is not staged "
                    f"(held: {held[1] if held else 'nothing'}); send it again"
                )
            sources.append(held[2])
        etag = multipart_etag([p.etag for p in parts])
        try:
            tmp = self._tmp()
            size, md5 = self._write_new(tmp, src=sources)
            for p, path in zip(parts, sources, strict=True):
                if p.size >= 0 and int(self.fs.size(path)) != p.size:
                    self._remove(tmp)
                    raise PartRuleError(f"complete of {key!r}: part {p.number} has another size")
            ours = Expected(size=size, etag=etag)
            info = self._publish_new(
                "complete",
                key,
                tmp,
                size,
                md5,
                etag,
                expected if expected else ours,
                dict(upload_meta.get("metadata") or {}),
            )
            self._drop_upload(upload_id)
        except OSError as exc:
            raise self._fail(exc, "complete", key) from exc
        return info

    def _drop_upload(self, upload_id: str) -> None:
        """Remove an upload: ``meta.json`` first (from then on the upload is unknown and a late
        part refuses itself), then the directory, again if a late part landed meanwhile."""
        self._remove(self._meta_path(upload_id))
        directory = self._upload_dir(upload_id)
        try:
            if self.local:
                for _ in range(10):
                    try:
                        shutil.rmtree(directory)
                        return
                    except FileNotFoundError:
                        if not os.path.exists(directory):
                            return
                    except OSError as exc:
                        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
                shutil.rmtree(directory)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(directory, recursive=True)
        finally:
            self.fs.invalidate_cache()

    def abort(self, key: str, upload_id: str) -> None:
        try:
            self._drop_upload(upload_id)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._fail(exc, "abort", key) from exc

    def put(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        _md5_required("put", key, payload)
        data = part_bytes(payload, key=key, number=1)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if md5 != payload.md5:
            raise StorageError(
                f"put of {key!r}: the bytes do not match their recorded MD5", retryable=True
            )
        expected = Expected(size=payload.size, etag=md5)
        existing = self.head(key)
        if existing is not None:
            if matches(existing, expected):
                return existing
            raise ObjectExistsError(
                f"put of {key!r} under {self.url}: an object already exists at the key; "
                "refusing to overwrite it"
            )
        try:
            tmp = self._tmp()
            self._write_new(tmp, [data])
            return self._publish_new(
                "put", key, tmp, payload.size, md5, md5, expected, dict(metadata or {})
            )
        except OSError as exc:
            raise self._fail(exc, "put", key) from exc

    def list_uploads(self, prefix: str = "") -> list[UploadRef]:
        base = self._p(HIDDEN, "uploads")
        self.fs.invalidate_cache()
        try:
            dirs = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for d in sorted(str(x) for x in dirs):
            upload_id = d.rstrip("/").rsplit("/", 1)[-1]
            meta = self._meta(upload_id)
            if meta is None:
                continue
            key = str(meta.get("key", ""))
            if not key.startswith(prefix):
                continue
            initiated = meta.get("initiated")
            out.append(
                UploadRef(
                    key=key,
                    upload_id=upload_id,
                    initiated=datetime.fromisoformat(initiated) if initiated else None,
                )
            )
        return out


def _md5_required(op: str, key: str, payload: Payload) -> None:
    """A staged backend keeps no CRC32C checksums: the crc32c mode cannot prove bytes here."""
    if payload.md5 is None:
        raise StorageError(
            f"{op} of {key!r}: the segment is recorded in the crc32c checksum mode (no part "
            "MD5s), which this backend cannot prove (it keeps no CRC32C checksums)",
            retryable=False,
        )
