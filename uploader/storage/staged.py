"""Atomic multipart uploads for any fsspec filesystem without them (``file://``, ``memory://``, ...).

Layout under the root (the first key component ``.uploader`` is reserved, so no key reaches it)::

    .uploader/uploads/<upload id>/meta.json                 key and start time of the upload
    .uploader/uploads/<upload id>/<part>.<seq>.<md5>        a staged part; the name carries its ETag
    .uploader/etags/<h[:2]>/<h>.<identity>.json            ETag of the object file <identity>
    .uploader/tmp/<random>                                 an object being assembled
    .uploader/aside/<random>(.json)                        an object being compared for a delete
    .uploader/locks/<nn>                                   flock stripes (local disk)

(``h`` is the SHA-256 of the key.) A part is written to a temporary name and renamed into place,
so a listed part is always whole. Sending a part number again stages a newer ``seq``; the newest
wins (idempotent by part number). A part renamed into an upload whose ``meta.json`` is gone (a
stale writer after ``abort`` or ``complete``) is removed again and refused with NoSuchUploadError:
``abort`` removes ``meta.json`` first, so the directory is never re-created or left half-alive.

``complete`` assembles the parts in order into a temporary file, streaming (never the whole object
in memory), writes its ETag sidecar, then publishes the object at its key in one exclusive step:

* on a local disk with ``os.link`` (atomic, and fails if the key exists: a conditional write),
  after ``fsync`` of the file; the directory is fsynced after the link, so a crash leaves either
  no object or the whole one;
* elsewhere with the filesystem's ``mv`` after an existence check, both under one process-wide
  lock (for ``memory://`` the move is a single dictionary assignment, so readers see nothing or
  everything, and the filesystem lives in this process, so the lock makes it exclusive).

ETags, and why ``head`` never reports ours for bytes we did not publish. Plain filesystems have no
ETags: a sidecar keeps the multipart ETag S3 would have given, so one ``head`` verifies like on S3.
A sidecar is named by the *identity of the object file* it describes, and ``head`` looks up only
the sidecar of the identity it finds at the key; without one it reports the MD5 of the bytes (the
ETag of a single PUT, never a multipart ETag). So the ETag and the bytes become visible together:

* local disk: identity = ``(st_dev, st_ino, st_mtime_ns, st_size)`` of the assembled temporary
  file, taken after its last write and fsync. ``os.link`` publishes that very inode, so the
  published object has the same identity. A writer killed after the sidecar and before the link
  leaves a sidecar naming an inode that is not at the key: a foreign object written there later
  (another inode, or the same inode number reused with another mtime) gets no ETag from it. A
  foreign writer rewriting our published file in place changes its mtime: it loses our ETag too.
  (Residual: a reused inode number with the same size *and* the same nanosecond mtime.)
* other filesystems (no inodes): identity = the MD5 of the whole content, taken while assembling;
  ``head`` reads the object to compute it. Exact (identical bytes are the same object), but
  ``head`` costs a full read there.

A publish that loses the race to another object (the exclusive step fails) removes its own file and
sidecar and then judges the object at the key by ``head`` alone: accepted only if it provably
matches what was expected, else ObjectExistsError.

``delete_if_match`` is compare-and-unlink (there is no unconditional delete), see its docstring.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from uploader.digest import Payload, multipart_etag, normalize_etag
from uploader.errors import (
    NoSuchBucketError,
    NoSuchUploadError,
    ObjectExistsError,
    PartRuleError,
    PreconditionFailedError,
    StorageError,
    UsageError,
)
from uploader.keys import check_components, check_full_length
from uploader.storage.base import MIN_PART_SIZE, Expected, ObjectInfo, PartRef, UploadRef
from uploader.storage.errors_map import translate_transport
from uploader.storage.rules import check_part_number, check_part_size, check_parts, matches

HIDDEN = ".uploader"
CHUNK = 1024 * 1024
LOCK_STRIPES = 64

#: Bytes this backend adds to a key component in the longest name it derives from one. The object
#: is linked at ``<root>/<key>`` from ``.uploader/tmp/<uuid>``; sidecars are named by the key's
#: SHA-256 and the file's identity, parts by upload id and number, aside files by a uuid: no name
#: grows with a component, so the longest derived name is the component itself. (Raise this if a
#: name like ``<component>.<suffix>`` is ever written next to an object.)
KEY_NAME_OVERHEAD = 0
#: Object stores behind fsspec (GCS, Azure, ...) count a name from the bucket, up to 1024 bytes.
OBJECT_NAME_BYTES = 1024

#: Non-local filesystems: publishing and conditional deletes are serialised in this process.
_PROCESS_LOCK = threading.RLock()


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (a rename or link in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_identity(st: os.stat_result) -> str:
    return f"i{st.st_dev}-{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _content_identity(md5: str, size: int) -> str:
    return f"m{md5}-{size}"


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
            self.name_max = _pathconf(self.root, "PC_NAME_MAX", 255)
            self.path_max = _pathconf(self.root, "PC_PATH_MAX", 4096)
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    @property
    def url(self) -> str:
        return self._url

    @property
    def min_part_size(self) -> int:
        return self._min_part_size

    def check_key(self, key: str) -> None:
        """The names this backend writes for ``key`` must fit the filesystem.

        Local disk: each component plus :data:`KEY_NAME_OVERHEAD` within the filesystem's name
        limit (``pathconf(root, "PC_NAME_MAX")``), and the whole path within its path limit.
        ``memory://``: no limit beyond the key's own. Other filesystems (object stores behind
        fsspec): the name after the bucket (the root's first component), prefix + ``/`` + key,
        within 1024 bytes.
        """
        if self.local:
            check_components(
                key,
                self.name_max - KEY_NAME_OVERHEAD,
                f"the filesystem of {self.root!r} (name limit {self.name_max} bytes)",
            )
            # PATH_MAX counts the terminating NUL.
            check_full_length(key, self.root, f"the filesystem of {self.root!r}", self.path_max - 1)
        elif "memory" not in _protocols(self.fs):
            _bucket, _, prefix = self.root.strip("/").partition("/")
            check_full_length(key, prefix, self.url, OBJECT_NAME_BYTES)

    def conditional_delete(self) -> bool:
        """True where compare-and-unlink is exact: local disk and the in-process ``memory://``.

        On other filesystems the check and the removal are serialised only within this process;
        another process or host writing the same key in between is not excluded: False.
        """
        return self.local or "memory" in _protocols(self.fs)

    # --- paths ---------------------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return (
            "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)
        )

    def _obj(self, key: str) -> str:
        return self._p(key)

    def _upload_dir(self, upload_id: str) -> str:
        return self._p(HIDDEN, "uploads", upload_id)

    def _meta_path(self, upload_id: str) -> str:
        return self._upload_dir(upload_id) + "/meta.json"

    def _sidecar(self, key: str, identity: str) -> str:
        h = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self._p(HIDDEN, "etags", h[:2], f"{h}.{identity}.json")

    def _fail(self, exc: BaseException, op: str, key: str | None) -> StorageError:
        where = f"{op} of {key!r} under {self.url}" if key else f"{op} under {self.url}"
        err = translate_transport(exc, where)
        return err if err is not None else StorageError(f"{where}: {exc}")

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """Excludes our own publishes and conditional deletes of ``key`` from each other.

        Local disk: ``flock`` on one of a few stripe files (per open file description, so it
        excludes threads of this process and other processes on this host; NFS may not honour
        it). Elsewhere: one lock for this process.
        """
        if not self.local:
            with _PROCESS_LOCK:
                yield
            return
        stripe = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % LOCK_STRIPES
        path = self._p(HIDDEN, "locks", f"{stripe:02d}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # --- writing files atomically ----------------------------------------------------------------

    def _write_new(
        self, path: str, chunks: Sequence[bytes] | None = None, src: list[str] | None = None
    ) -> tuple[int, str]:
        """Write a file at a fresh temporary path; return its size and MD5."""
        digest = hashlib.md5(usedforsecurity=False)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                size = self._fill(out, digest, chunks, src)
                out.flush()
                os.fsync(out.fileno())
        else:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            with self.fs.open(path, "wb") as out:
                size = self._fill(out, digest, chunks, src)
        return size, digest.hexdigest()

    def _fill(
        self, out: Any, digest: Any, chunks: Sequence[bytes] | None, src: list[str] | None
    ) -> int:
        size = 0
        for chunk in chunks or ():
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        for path in src or ():
            with self.fs.open(path, "rb") as f:
                while block := f.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
        return size

    def _rename(self, tmp: str, final: str) -> None:
        """Replace ``final`` with ``tmp`` in one step (creating its directory: ours only)."""
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(os.path.dirname(final))
        else:
            self.fs.makedirs(self.fs._parent(final), exist_ok=True)
            self.fs.mv(tmp, final)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm(path)

    def _publish(self, tmp: str, key: str) -> bool:
        """Move ``tmp`` to the key unless something is there already. True if published."""
        dest = self._obj(key)
        if self.local:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with self._key_lock(key):
                try:
                    os.link(tmp, dest)  # atomic and exclusive: the conditional write
                except FileExistsError:
                    os.unlink(tmp)
                    return False
            os.unlink(tmp)
            fsync_dir(os.path.dirname(dest))
            return True
        with self._key_lock(key):
            self.fs.invalidate_cache()
            if self.fs.exists(dest):
                self.fs.rm(tmp)
                return False
            self.fs.makedirs(self.fs._parent(dest), exist_ok=True)
            self.fs.mv(tmp, dest)
            return True

    def _tmp(self) -> str:
        return self._p(HIDDEN, "tmp", uuid.uuid4().hex)

    def _identity_of_new(self, path: str, size: int, md5: str) -> str:
        """The identity the object file ``path`` (fully written) will have once published."""
        if self.local:
            return _local_identity(os.stat(path))
        return _content_identity(md5, size)

    def _write_sidecar(
        self, key: str, identity: str, size: int, etag: str, metadata: Mapping[str, str]
    ) -> str:
        """Record ``etag`` and the object's ``metadata`` for the object file ``identity``;
        return the sidecar's path. Named by the file's identity, both are published with it."""
        path = self._sidecar(key, identity)
        tmp = self._tmp()
        doc = {"key": key, "size": size, "etag": etag, "meta": dict(metadata)}
        self._write_new(tmp, [json.dumps(doc).encode()])
        self._rename(tmp, path)
        return path

    def _publish_new(
        self,
        op: str,
        key: str,
        tmp: str,
        size: int,
        md5: str,
        etag: str,
        expected: Expected,
        metadata: Mapping[str, str],
    ) -> ObjectInfo:
        """Sidecar for the assembled ``tmp``, then the exclusive publish; judge a lost race."""
        sidecar = self._write_sidecar(
            key, self._identity_of_new(tmp, size, md5), size, etag, metadata
        )
        if self._publish(tmp, key):
            return ObjectInfo(key=key, size=size, etag=etag)
        # Lost the race: our file is gone; so must be its sidecar. The object at the key is
        # someone else's unless it provably is what we expected (judged by head alone).
        self._remove(sidecar)
        info = self.head(key)
        if matches(info, expected):
            assert info is not None
            return info
        raise ObjectExistsError(
            f"{op} of {key!r} under {self.url}: an object appeared at the key "
            f"({info.size if info else '?'} bytes, etag {info.etag if info else '?'}); "
            "refusing to overwrite it"
        )

    # --- the Storage protocol -------------------------------------------------------------------------

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
        try:
            with self.fs.open(self._meta_path(upload_id), "rb") as f:
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
            return self._publish_new(
                "put", key, tmp, payload.size, md5, md5, expected, dict(metadata or {})
            )
        except OSError as exc:
            raise self._fail(exc, "put", key) from exc

    def _judge(self, key: str, path: str) -> tuple[ObjectInfo, str] | None:
        """What ``head`` reports for the object file at ``path`` (published for ``key``), and
        the path of the sidecar that file's identity would have. None if there is no file."""
        if self.local:
            try:
                f = open(path, "rb")  # noqa: SIM115 - one descriptor for stat and read
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
            with f:
                st = os.fstat(f.fileno())
                sidecar = self._sidecar(key, _local_identity(st))
                etag = self._sidecar_etag(key, sidecar, st.st_size)
                if etag is None:
                    digest = hashlib.md5(usedforsecurity=False)
                    while block := f.read(CHUNK):
                        digest.update(block)
                    etag = digest.hexdigest()
                return ObjectInfo(key=key, size=st.st_size, etag=etag), sidecar
        self.fs.invalidate_cache()
        try:
            if not self.fs.isfile(path):
                return None
            digest = hashlib.md5(usedforsecurity=False)
            size = 0
            with self.fs.open(path, "rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            return None
        md5 = digest.hexdigest()
        sidecar = self._sidecar(key, _content_identity(md5, size))
        etag = self._sidecar_etag(key, sidecar, size)
        return ObjectInfo(key=key, size=size, etag=etag or md5), sidecar

    def _sidecar_doc(self, key: str, sidecar: str, size: int) -> dict[str, Any] | None:
        try:
            with self.fs.open(sidecar, "rb") as f:
                side = json.loads(f.read())
            if side.get("key") == key and int(side["size"]) == size and "etag" in side:
                return dict(side)
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return None

    def _sidecar_etag(self, key: str, sidecar: str, size: int) -> str | None:
        side = self._sidecar_doc(key, sidecar, size)
        return None if side is None else str(side["etag"])

    def head_metadata(self, key: str) -> tuple[ObjectInfo, dict[str, str]] | None:
        """The metadata lives in the ETag sidecar of the object file's identity: an object
        whose file is not the one we published (a foreign writer) has none."""
        try:
            judged = self._judge(key, self._obj(key))
            if judged is None:
                return None
            info, sidecar = judged
            side = self._sidecar_doc(key, sidecar, info.size)
        except OSError as exc:
            raise self._fail(exc, "head_metadata", key) from exc
        meta = side.get("meta") if side is not None else None
        if not isinstance(meta, dict):
            return info, {}
        return info, {str(k): str(v) for k, v in meta.items()}

    def list_objects(self, prefix: str = "") -> list[str]:
        root = self.root.rstrip("/")
        keys: list[str] = []
        try:
            if self.local:
                for dirpath, dirnames, filenames in os.walk(self.root):
                    if os.path.samefile(dirpath, self.root) and HIDDEN in dirnames:
                        dirnames.remove(HIDDEN)
                    rel_dir = os.path.relpath(dirpath, self.root)
                    for name in filenames:
                        rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                        keys.append(rel.replace(os.sep, "/"))
            else:
                self.fs.invalidate_cache()
                for path in self.fs.find(root):
                    rel = str(path)[len(root) + 1 :] if root != "/" else str(path).lstrip("/")
                    keys.append(rel)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._fail(exc, "list_objects", None) from exc
        hidden = HIDDEN + "/"
        return sorted(k for k in keys if not k.startswith(hidden) and k.startswith(prefix))

    def _hidden(self, name: str) -> str:
        return self._p(HIDDEN, *name.split("/"))

    def write_hidden(self, name: str, data: bytes) -> None:
        try:
            tmp = self._tmp()
            self._write_new(tmp, [data])
            self._rename(tmp, self._hidden(name))
        except OSError as exc:
            raise self._fail(exc, "write_hidden", name) from exc

    def read_hidden(self, name: str) -> bytes | None:
        try:
            with self.fs.open(self._hidden(name), "rb") as f:
                data: bytes = f.read()
                return data
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail(exc, "read_hidden", name) from exc

    def head(self, key: str) -> ObjectInfo | None:
        try:
            judged = self._judge(key, self._obj(key))
        except OSError as exc:
            raise self._fail(exc, "head", key) from exc
        return None if judged is None else judged[0]

    def delete_if_match(self, key: str, etag: str) -> None:
        """Compare-and-unlink: remove the object at ``key`` only if ``head`` would report ``etag``.

        Local disk, under the key's lock (the one every publish of ours takes around its
        exclusive ``os.link``): the object is first renamed to a private name under
        ``.uploader/aside/`` (atomic), so what is judged is exactly what will be unlinked: a
        writer replacing the key meanwhile cannot get its file removed by us. Matching: it is
        unlinked with its sidecar. Not matching: it is linked back (exclusively); no publish of
        ours can have taken the key meanwhile, since they wait for the lock. Only a writer
        outside this protocol can have: then our file is kept under ``.uploader/quarantine/``
        and the error says so. A crash between the two steps leaves the object under
        ``.uploader/aside/`` with a ``.json`` naming its key (never destroyed).

        Elsewhere: the check and the removal happen under one process-wide lock, which is exact
        for ``memory://`` (it lives in this process); on a shared filesystem another process
        may still write between them (see :meth:`conditional_delete`).
        """
        want = normalize_etag(etag) or ""
        try:
            if self.local:
                self._delete_if_match_local(key, want)
                return
            with self._key_lock(key):
                judged = self._judge(key, self._obj(key))
                if judged is None:
                    return
                info, sidecar = judged
                if info.etag != want:
                    raise PreconditionFailedError(key, want, info.etag, where="delete")
                self.fs.rm(self._obj(key))
                self._remove(sidecar)
        except OSError as exc:
            raise self._fail(exc, "delete_if_match", key) from exc
        finally:
            self.fs.invalidate_cache()

    def _delete_if_match_local(self, key: str, want: str) -> None:
        dest = self._obj(key)
        if not os.path.isfile(dest):
            return
        name = uuid.uuid4().hex
        aside = self._p(HIDDEN, "aside", name)
        note = aside + ".json"
        # The note says which key the aside file belongs to, should we die holding it.
        self._rename_note(note, key)
        with self._key_lock(key):
            try:
                os.rename(dest, aside)
            except FileNotFoundError:
                self._remove(note)
                return
            judged = self._judge(key, aside)
            assert judged is not None  # a private name: nobody else touches it
            info, sidecar = judged
            if info.etag == want:
                os.unlink(aside)
                fsync_dir(os.path.dirname(dest))
                self._remove(sidecar)
                self._remove(note)
                return
            try:
                os.link(aside, dest)  # same inode back at the key: same identity, same ETag
            except FileExistsError:
                kept = self._p(HIDDEN, "quarantine", name)
                os.makedirs(os.path.dirname(kept), exist_ok=True)
                os.rename(aside, kept)
                os.rename(note, kept + ".json")
                raise PreconditionFailedError(
                    key,
                    want,
                    info.etag,
                    where="delete",
                    detail=(
                        f"; a writer outside the uploader replaced the key meanwhile, the "
                        f"object that was there is kept at {kept}"
                    ),
                ) from None
            os.unlink(aside)
            fsync_dir(os.path.dirname(dest))
            self._remove(note)
            raise PreconditionFailedError(key, want, info.etag, where="delete")

    def _rename_note(self, note: str, key: str) -> None:
        tmp = self._tmp()
        self._write_new(tmp, [json.dumps({"key": key}).encode()])
        self._rename(tmp, note)

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

    def clean_tmp(self, older_than: float, *, dry_run: bool = False) -> list[str]:
        """Remove leftovers of the staging area older than ``older_than`` seconds.

        * objects-in-assembly under ``.uploader/tmp``: a ``complete`` or ``put`` interrupted
          between assembling and publishing leaves its temporary file behind; nothing refers to
          it (listed by their name);
        * upload directories without ``meta.json`` under ``.uploader/uploads``: a crash inside
          ``abort``/``complete`` (after ``meta.json`` went, before the directory did), or a late
          part of an older version that re-created a finished upload's directory. Without its
          metadata an upload is unknown to every call (``list_uploads`` skips it, a part is
          refused), so nothing but this removes it. Its age is its newest sign of life (the
          directory's and its files' times, the time in its upload id); one with no known time
          is kept. Listed as ``uploads/<upload id>``.

        Returns the names removed (or that would be, with ``dry_run``).
        """
        cutoff = time.time() - older_than
        removed = []
        base = self._p(HIDDEN, "tmp")
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            name = str(entry["name"])
            stamp = _stamp(entry)
            if stamp is not None and stamp > cutoff:
                continue
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(name)
            removed.append(name.rsplit("/", 1)[-1])
        removed.extend(self._clean_metaless_uploads(cutoff, dry_run=dry_run))
        return removed

    def _clean_metaless_uploads(self, cutoff: float, *, dry_run: bool) -> list[str]:
        base = self._p(HIDDEN, "uploads")
        try:
            dirs = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        removed = []
        for entry in dirs:
            directory = str(entry["name"]).rstrip("/")
            upload_id = directory.rsplit("/", 1)[-1]
            if self.fs.exists(self._meta_path(upload_id)):
                continue  # a known upload: list_uploads and the sweep's abort judge it
            newest = self._newest_stamp(directory, entry, upload_id)
            if newest is None or newest > cutoff:
                continue
            if not dry_run:
                self.fs.invalidate_cache()
                if self.fs.exists(self._meta_path(upload_id)):
                    continue
                try:
                    if self.local:
                        shutil.rmtree(directory)
                    else:
                        self.fs.rm(directory, recursive=True)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue  # a late part landing meanwhile: young now; a later sweep judges it
                finally:
                    self.fs.invalidate_cache()
            removed.append(f"uploads/{upload_id}")
        return removed

    def _newest_stamp(self, directory: str, entry: dict[str, Any], upload_id: str) -> float | None:
        """The newest time known of an upload directory: its own, its files', its id's."""
        stamps = [_stamp(entry)]
        try:
            stamps.extend(_stamp(e) for e in self.fs.ls(directory, detail=True))
        except FileNotFoundError:
            return None  # gone meanwhile
        head = upload_id.split("-", 1)[0]
        if len(head) == 13 and head.isdigit():
            stamps.append(int(head) / 1000)  # start_upload's milliseconds
        known = [s for s in stamps if s is not None]
        return max(known) if known else None

    def close(self) -> None:
        """Nothing to release: fsspec filesystems hold no connections here."""


def _stamp(entry: dict[str, Any]) -> float | None:
    """An fsspec listing entry's modification (or creation) time, seconds since the epoch."""
    stamp: Any = entry.get("mtime", entry.get("created"))
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return None if stamp is None else float(stamp)


def _pathconf(path: str, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = getattr(fs, "protocol", ())
    return (proto,) if isinstance(proto, str) else tuple(proto)
