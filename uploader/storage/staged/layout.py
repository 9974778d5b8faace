"""The staging area of :class:`~uploader.storage.staged.StagedStorage`: where every file lives under
the root, the key locks, and writing a file atomically (temporary name, fsync, rename).

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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from uploader.errors import (
    NoSuchBucketError,
    StorageError,
    UsageError,
)
from uploader.keys import check_components, check_full_length
from uploader.storage.base import MIN_PART_SIZE
from uploader.storage.errors_map import translate_transport

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


class StagedFiles:
    """The root, its staging area's paths and locks, atomic file writes (base of the backend)."""

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

    def _hidden(self, name: str) -> str:
        return self._p(HIDDEN, *name.split("/"))

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

    def _tmp(self) -> str:
        return self._p(HIDDEN, "tmp", uuid.uuid4().hex)

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

    def list_hidden(self, prefix: str) -> list[str]:
        folder, _, start = prefix.rpartition("/")
        where = self._hidden(folder) if folder else self._p(HIDDEN)
        try:
            found = self.fs.ls(where, detail=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._fail(exc, "list_hidden", prefix) from exc
        names = (
            str(e["name"]).rstrip("/").rpartition("/")[2] for e in found if e["type"] == "file"
        )
        return sorted(f"{folder}/{n}" if folder else n for n in names if n.startswith(start))

    def close(self) -> None:
        """Nothing to release: fsspec filesystems hold no connections here."""


def _pathconf(path: str, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = getattr(fs, "protocol", ())
    return (proto,) if isinstance(proto, str) else tuple(proto)
