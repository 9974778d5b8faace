"""Atomic multipart uploads for any fsspec filesystem without them (``file://``, ``memory://``, ...).

Layout under the root (the first key component ``.uploader`` is reserved, so no key reaches it)::

    .uploader/uploads/<upload id>/meta.json                 key and start time of the upload
    .uploader/uploads/<upload id>/<part>.<seq>.<md5>        a staged part; the name carries its ETag
    .uploader/etags/<key>.json                             size and ETag of a published object
    .uploader/tmp/<random>                                 an object being assembled

A part is written to a temporary name and renamed into place, so a listed part is always whole.
Sending a part number again stages a newer ``seq``; the newest wins (idempotent by part number).
``complete`` assembles the parts in order into a temporary file, streaming (never the whole object
in memory), writes the ETag sidecar, then publishes the object at its key in one step:

* on a local disk with ``os.link`` (atomic, and fails if the key exists: a conditional write),
  after ``fsync`` of the file; the directory is fsynced after the link, so a crash leaves either
  no object or the whole one;
* elsewhere with the filesystem's ``mv`` after an existence check (for ``memory://`` the move is
  a single dictionary assignment, so readers see nothing or everything).

Plain filesystems have no ETags: the sidecar keeps the multipart ETag S3 would have given, so one
``head`` verifies like on S3. Without a sidecar, ``head`` computes the MD5 of the object.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from uploader.digest import Payload, multipart_etag
from uploader.errors import (
    NoSuchBucketError,
    NoSuchUploadError,
    ObjectExistsError,
    PartRuleError,
    StorageError,
    UsageError,
)
from uploader.storage.base import MIN_PART_SIZE, Expected, ObjectInfo, PartRef, UploadRef
from uploader.storage.errors_map import translate_transport
from uploader.storage.rules import check_part_number, check_part_size, check_parts, matches

HIDDEN = ".uploader"
CHUNK = 1024 * 1024


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedStorage:
    """Parts staged under ``<root>/.uploader/``, objects published whole by an atomic step."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        min_part_size: int = MIN_PART_SIZE,
    ) -> None:
        try:
            fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ValueError, ImportError) as exc:
            raise UsageError(f"remote {url!r}: fsspec cannot open it ({exc})") from None
        self.fs = fs
        self.root = str(root).rstrip("/") or "/"
        self.local = isinstance(fs, LocalFileSystem)
        self._url = url
        self._min_part_size = min_part_size
        if self.local:
            if not os.path.isdir(self.root):
                raise NoSuchBucketError(
                    f"remote root {self.root!r} does not exist or is not a directory; create it"
                )
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    @property
    def url(self) -> str:
        return self._url

    @property
    def min_part_size(self) -> int:
        return self._min_part_size

    # --- paths ---------------------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return (
            "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)
        )

    def _obj(self, key: str) -> str:
        return self._p(key)

    def _upload_dir(self, upload_id: str) -> str:
        return self._p(HIDDEN, "uploads", upload_id)

    def _sidecar(self, key: str) -> str:
        return self._p(HIDDEN, "etags", key + ".json")

    def _fail(self, exc: BaseException, op: str, key: str | None) -> StorageError:
        where = f"{op} of {key!r} under {self.url}" if key else f"{op} under {self.url}"
        err = translate_transport(exc, where)
        return err if err is not None else StorageError(f"{where}: {exc}")

    # --- writing files atomically ----------------------------------------------------------------

    def _write_new(
        self, path: str, chunks: Sequence[bytes] | None = None, src: list[str] | None = None
    ) -> int:
        """Write a file at a fresh temporary path from ``chunks`` or by streaming ``src`` files."""
        size = 0
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                size = self._fill(out, chunks, src)
                out.flush()
                os.fsync(out.fileno())
        else:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            with self.fs.open(path, "wb") as out:
                size = self._fill(out, chunks, src)
        return size

    def _fill(self, out: Any, chunks: Sequence[bytes] | None, src: list[str] | None) -> int:
        size = 0
        for chunk in chunks or ():
            out.write(chunk)
            size += len(chunk)
        for path in src or ():
            with self.fs.open(path, "rb") as f:
                while block := f.read(CHUNK):
                    out.write(block)
                    size += len(block)
        return size

    def _rename(self, tmp: str, final: str) -> None:
        """Replace ``final`` with ``tmp`` in one step."""
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(os.path.dirname(final))
        else:
            self.fs.makedirs(self.fs._parent(final), exist_ok=True)
            self.fs.mv(tmp, final)

    def _publish(self, tmp: str, key: str) -> bool:
        """Move ``tmp`` to the key unless something is there already. True if published."""
        dest = self._obj(key)
        if self.local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                os.link(tmp, dest)  # atomic and exclusive: the conditional write
            except FileExistsError:
                os.unlink(tmp)
                return False
            os.unlink(tmp)
            _fsync_dir(os.path.dirname(dest))
            return True
        self.fs.invalidate_cache()
        if self.fs.exists(dest):
            self.fs.rm(tmp)
            return False
        self.fs.makedirs(self.fs._parent(dest), exist_ok=True)
        self.fs.mv(tmp, dest)
        return True

    def _tmp(self) -> str:
        return self._p(HIDDEN, "tmp", uuid.uuid4().hex)

    def _write_sidecar(self, key: str, size: int, etag: str) -> None:
        tmp = self._tmp()
        self._write_new(tmp, [json.dumps({"size": size, "etag": etag}).encode()])
        self._rename(tmp, self._sidecar(key))

    # --- the Storage protocol -------------------------------------------------------------------------

    def start_upload(self, key: str) -> str:
        upload_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex}"
        meta = {"key": key, "initiated": datetime.now(UTC).replace(tzinfo=None).isoformat()}
        try:
            tmp = self._tmp()
            self._write_new(tmp, [json.dumps(meta).encode()])
            self._rename(tmp, self._p(HIDDEN, "uploads", upload_id, "meta.json"))
        except OSError as exc:
            raise self._fail(exc, "start_upload", key) from exc
        return upload_id

    def _meta(self, upload_id: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._upload_dir(upload_id) + "/meta.json", "rb") as f:
                meta: dict[str, Any] = json.loads(f.read())
                return meta
        except FileNotFoundError:
            return None

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

    def upload_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartRef:
        check_part_number(key, number)
        check_part_size(key, number, payload.size)
        self._require(key, upload_id, "upload_part")
        md5 = hashlib.md5(payload.data, usedforsecurity=False).hexdigest()
        if md5 != payload.md5:
            raise StorageError(
                f"upload_part of {key!r} part {number}: the bytes do not match their recorded MD5",
                retryable=True,
            )
        final = f"{self._upload_dir(upload_id)}/{number:05d}.{time.time_ns()}.{md5}"
        try:
            tmp = self._tmp()
            self._write_new(tmp, [payload.data])
            self._rename(tmp, final)
            for old_seq, _md5, path in [
                v for n, v in self._staged(upload_id).items() if n == number and v[2] != final
            ]:
                del old_seq
                self.fs.rm(path)
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
        if self._meta(upload_id) is None:
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
            size = self._write_new(tmp, src=sources)
            for p, path in zip(parts, sources, strict=True):
                if p.size >= 0 and int(self.fs.size(path)) != p.size:
                    raise PartRuleError(f"complete of {key!r}: part {p.number} has another size")
            self._write_sidecar(key, size, etag)  # before the object: head never sees it bare
            if not self._publish(tmp, key):
                info = self.head(key)
                if matches(info, expected):
                    assert info is not None
                    return info
                raise ObjectExistsError(
                    f"complete of {key!r} under {self.url}: an object appeared at the key; "
                    "refusing to overwrite it"
                )
            self.fs.rm(self._upload_dir(upload_id), recursive=True)
        except OSError as exc:
            raise self._fail(exc, "complete", key) from exc
        return ObjectInfo(key=key, size=size, etag=etag)

    def abort(self, key: str, upload_id: str) -> None:
        try:
            self.fs.rm(self._upload_dir(upload_id), recursive=True)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._fail(exc, "abort", key) from exc
        finally:
            self.fs.invalidate_cache()

    def put(self, key: str, payload: Payload) -> ObjectInfo:
        md5 = hashlib.md5(payload.data, usedforsecurity=False).hexdigest()
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
            self._write_new(tmp, [payload.data])
            self._write_sidecar(key, payload.size, md5)
            if not self._publish(tmp, key):
                info = self.head(key)
                if matches(info, expected):
                    assert info is not None
                    return info
                raise ObjectExistsError(
                    f"put of {key!r} under {self.url}: an object appeared at the key; "
                    "refusing to overwrite it"
                )
        except OSError as exc:
            raise self._fail(exc, "put", key) from exc
        return ObjectInfo(key=key, size=payload.size, etag=md5)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._obj(key)
        try:
            self.fs.invalidate_cache()
            size = int(self.fs.size(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail(exc, "head", key) from exc
        try:
            with self.fs.open(self._sidecar(key), "rb") as f:
                side = json.loads(f.read())
            if int(side["size"]) == size:
                return ObjectInfo(key=key, size=size, etag=str(side["etag"]))
        except (FileNotFoundError, ValueError, KeyError):
            pass
        # No (matching) sidecar: the ETag of a single PUT, computed by reading the object.
        digest = hashlib.md5(usedforsecurity=False)
        with self.fs.open(path, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
        return ObjectInfo(key=key, size=size, etag=digest.hexdigest())

    def read(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            with self.fs.open(self._obj(key), "rb") as f:
                f.seek(start)
                data: bytes = f.read(end - start)
                return data
        except OSError as exc:
            raise self._fail(exc, "read", key) from exc

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

    def delete(self, key: str) -> None:
        for path in (self._obj(key), self._sidecar(key)):
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._fail(exc, "delete", key) from exc
        self.fs.invalidate_cache()

    def clean_tmp(self, older_than: float, *, dry_run: bool = False) -> list[str]:
        """Remove objects-in-assembly left under ``.uploader/tmp`` by a crash (older than that).

        A ``complete`` or ``put`` interrupted between assembling and publishing leaves its
        temporary file behind; nothing refers to it. Returns the names removed (or that would be).
        """
        base = self._p(HIDDEN, "tmp")
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        cutoff = time.time() - older_than
        removed = []
        for entry in entries:
            name = str(entry["name"])
            stamp = entry.get("mtime", entry.get("created"))
            if hasattr(stamp, "timestamp"):
                stamp = stamp.timestamp()
            if stamp is not None and float(stamp) > cutoff:
                continue
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(name)
            removed.append(name.rsplit("/", 1)[-1])
        return removed

    def close(self) -> None:
        """Nothing to release: fsspec filesystems hold no connections here."""
