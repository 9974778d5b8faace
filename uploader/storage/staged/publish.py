"""Publishing an object in one exclusive step, and the compare-and-unlink delete.

``complete`` assembles the parts in order into a temporary file, streaming (never the whole object
in memory), writes its ETag sidecar, then publishes the object at its key in one exclusive step:

* on a local disk with ``os.link`` (atomic, and fails if the key exists: a conditional write),
  after ``fsync`` of the file; the directory is fsynced after the link, so a crash leaves either
  no object or the whole one;
* elsewhere with the filesystem's ``mv`` after an existence check, both under one process-wide
  lock (for ``memory://`` the move is a single dictionary assignment, so readers see nothing or
  everything, and the filesystem lives in this process, so the lock makes it exclusive).

A publish that loses the race to another object (the exclusive step fails) removes its own file and
sidecar and then judges the object at the key by ``head`` alone: accepted only if it provably
matches what was expected, else ObjectExistsError.

``delete_if_match`` is compare-and-unlink (there is no unconditional delete), see its docstring.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping

from uploader.digest import normalize_etag
from uploader.errors import (
    ObjectExistsError,
    PreconditionFailedError,
)
from uploader.storage.base import Expected, ObjectInfo
from uploader.storage.rules import matches
from uploader.storage.staged.etags import StagedObjects
from uploader.storage.staged.layout import HIDDEN, fsync_dir


class StagedPublish(StagedObjects):
    """The exclusive publish (``os.link`` + fsync, or ``mv`` under the process lock) and
    ``delete_if_match``, both under the key's lock."""

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
