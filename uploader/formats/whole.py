"""``whole``: only rolled files, whole (archived WAL segments, files copied in when finished)."""

from __future__ import annotations

import os

from uploader.formats import Scan


class WholeFormat:
    """Nothing is valid until the file rolled; then all of it is."""

    name = "whole"
    preallocated = False

    def begun(self, path: str) -> bool:
        return True

    def scan(self, path: str, start: int, *, rolled: bool) -> Scan:
        if not rolled:
            return Scan(valid_end=start, complete=False)
        return Scan(valid_end=os.stat(path).st_size, complete=True)
