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


def _short(key: str) -> str:
    return repr(key) if len(key) <= 60 else f"{key[:40]!r}...{key[-12:]!r}"


def check_full_length(key: str, prefix: str, where: str, limit: int = MAX_KEY_BYTES) -> None:
    """Refuse ``key`` if ``prefix + "/" + key`` (the name the remote stores) exceeds ``limit``.

    ``prefix`` is what the remote puts before the key (an S3 prefix within its bucket); empty
    for none.
    """
    full = f"{prefix}/{key}" if prefix else key
    size = len(full.encode("utf-8"))
    if size > limit:
        raise InvalidKeyError(
            f"segment key {_short(key)} is {len(key.encode('utf-8'))} bytes, "
            f"{size} bytes as {where} names it (prefix {prefix!r} + '/' + key); "
            f"the limit is {limit}"
        )


def check_components(key: str, limit: int, where: str) -> None:
    """Refuse ``key`` if one of its path components is longer than ``limit`` UTF-8 bytes."""
    for part in key.split("/"):
        size = len(part.encode("utf-8"))
        if size > limit:
            raise InvalidKeyError(
                f"segment key {_short(key)} has a path component of {size} bytes "
                f"({_short(part)}); {where} allows at most {limit} bytes per component"
            )
