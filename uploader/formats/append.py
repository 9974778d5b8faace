"""``append``: a file that only grows by appending; its size is its valid end."""

from __future__ import annotations

import os

from uploader.formats import Scan


class AppendFormat:
    """The valid end is the file size; the file is complete once it rolled.

    On a preallocated file (written in place) this ships bytes that are not written yet: use the
    file's own format (``rocketmq``) or ``whole`` there."""

    name = "append"
    preallocated = False

    def begun(self, path: str) -> bool:
        return True  # appended files are created by their first write

    def scan(self, path: str, start: int, *, rolled: bool) -> Scan:
        return Scan(valid_end=os.stat(path).st_size, complete=rolled)
