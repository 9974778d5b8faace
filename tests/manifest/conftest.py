from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import migrate
from uploader.manifest.repo import Manifest


def open_manifest(url: str) -> Manifest:
    """Open a manifest, running the migrations first on a server database (as an operator would)."""
    migrate(url)
    return Manifest.open(url)


@pytest.fixture
def manifest(manifest_url: str) -> Iterator[Manifest]:
    # manifest_url is already at head for this fixture (tests/conftest.py, MIGRATING_FIXTURES).
    m = Manifest.open(manifest_url)
    try:
        yield m
    finally:
        m.close()
