"""Where the CLI's manifest and remote come from: options, then environment, then embedded defaults.

* ``UPLOADER_MANIFEST``: SQLAlchemy URL of the manifest;
* ``UPLOADER_REMOTE``: fsspec URL of the remote root;
* ``UPLOADER_STORAGE_OPTIONS``: JSON object passed to fsspec (endpoint_url, key, secret, ...);
* ``UPLOADER_HOME``: the data directory of the embedded defaults (``./.uploader``): an SQLite
  manifest ``manifest.db`` and a local remote ``remote/`` beside it.

Storage options often hold secrets: :func:`redact_options` is the only form that is ever printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from uploader.errors import UsageError

SECRET_WORDS = ("secret", "password", "token", "key", "credential", "session", "auth")


def data_dir(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("UPLOADER_HOME") or Path.cwd() / ".uploader")


def default_manifest(home: Path) -> str:
    return f"sqlite:///{home / 'manifest.db'}"


def default_remote(home: Path) -> str:
    return f"file://{home / 'remote'}"


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse the JSON of ``--storage-options``; a UsageError that never echoes the text."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # Not echoing the text: it may hold a secret.
        raise UsageError(
            f"storage options are not valid JSON ({exc.msg} at line {exc.lineno} column "
            f'{exc.colno}); give an object such as \'{{"endpoint_url": "http://..."}}\''
        ) from None
    if not isinstance(value, dict):
        raise UsageError(
            f"storage options must be a JSON object, not {type(value).__name__}; "
            'e.g. \'{"endpoint_url": "http://..."}\''
        )
    return value


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS) and lowered not in ("key_prefix",)


def redact_options(options: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to print: values of secret-looking names replaced by ``***``."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, dict):
            out[name] = redact_options(value)
        elif _is_secret(str(name)):
            out[name] = "***"
        else:
            out[name] = value
    return out


def redact_url(url: str) -> str:
    """A remote URL without a password (``s3://user:pw@bucket`` is legal fsspec)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class Settings:
    manifest: str
    remote: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    home: Path = field(default_factory=data_dir)

    @property
    def embedded_remote(self) -> bool:
        return self.remote == default_remote(self.home)


def resolve(
    *,
    manifest: str | None,
    remote: str | None,
    storage_options: str | None,
    home: str | None = None,
    create: bool = True,
) -> Settings:
    """Options first, then ``UPLOADER_*`` variables, then the embedded defaults (the embedded
    remote directory is created unless ``create`` is false: commands that only read)."""
    base = data_dir(home)
    manifest = manifest or os.environ.get("UPLOADER_MANIFEST") or default_manifest(base)
    remote = remote or os.environ.get("UPLOADER_REMOTE") or default_remote(base)
    text = storage_options
    if text is None:
        text = os.environ.get("UPLOADER_STORAGE_OPTIONS")
    options = parse_storage_options(text)
    if create and remote == default_remote(base):
        (base / "remote").mkdir(parents=True, exist_ok=True)
    return Settings(manifest=manifest, remote=remote, storage_options=options, home=base)
