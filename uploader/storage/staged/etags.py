"""ETag sidecars tied to the identity of the object file, and what ``head`` reports.

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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from uploader.storage.base import ObjectInfo
from uploader.storage.staged.layout import CHUNK, HIDDEN, StagedFiles


def _local_identity(st: os.stat_result) -> str:
    return f"i{st.st_dev}-{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _content_identity(md5: str, size: int) -> str:
    return f"m{md5}-{size}"


class StagedObjects(StagedFiles):
    """Reading published objects: ``head`` judged by the file's identity, its sidecar, bytes, listing."""

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

    def head(self, key: str) -> ObjectInfo | None:
        try:
            judged = self._judge(key, self._obj(key))
        except OSError as exc:
            raise self._fail(exc, "head", key) from exc
        return None if judged is None else judged[0]

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
