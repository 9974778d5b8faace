"""The sweep of the staging area: leftovers of interrupted assemblies and upload directories
without ``meta.json`` (``clean_tmp``, called by :func:`uploader.recovery.sweep`)."""

from __future__ import annotations

import contextlib
import shutil
import time
from datetime import datetime
from typing import Any

from uploader.storage.staged.layout import HIDDEN, StagedFiles


class StagedSweep(StagedFiles):
    """Removes what nothing refers to any more, older than a cutoff."""

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


def _stamp(entry: dict[str, Any]) -> float | None:
    """An fsspec listing entry's modification (or creation) time, seconds since the epoch."""
    stamp: Any = entry.get("mtime", entry.get("created"))
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return None if stamp is None else float(stamp)
