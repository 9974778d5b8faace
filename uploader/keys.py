"""Segment keys: object paths under the remote root.

A key is validated before anything is recorded or sent, so that no segment can escape its root or
collide with the staging area of the staged backend.
"""

from __future__ import annotations

import unicodedata

from uploader.errors import InvalidKeyError

MAX_KEY_BYTES = 1024
#: Keys under this first component are reserved for staged parts of non-S3 backends.
RESERVED_PREFIX = ".uploader"


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object path, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str) or key == "":
        raise InvalidKeyError("segment key is empty; give a relative path such as 'commitlog/0000'")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKeyError(
            f"segment key {key[:40]!r}... is {len(key.encode('utf-8'))} bytes; "
            f"the limit is {MAX_KEY_BYTES}"
        )
    for ch in key:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs") or ch == "\\":
            raise InvalidKeyError(
                f"segment key {key!r} contains the control or escape character {ch!r}; "
                "use printable characters and '/' as separator"
            )
    if key.startswith("/"):
        raise InvalidKeyError(
            f"segment key {key!r} is absolute; keys are relative to the remote root"
        )
    parts = key.split("/")
    for part in parts:
        if part == "":
            raise InvalidKeyError(
                f"segment key {key!r} has an empty path component ('//' or '/' at the end)"
            )
        if part in (".", ".."):
            raise InvalidKeyError(
                f"segment key {key!r} contains {part!r}; it would escape the root"
            )
    if parts[0] == RESERVED_PREFIX:
        raise InvalidKeyError(
            f"segment key {key!r} starts with the reserved component {RESERVED_PREFIX!r}"
        )
    return key
