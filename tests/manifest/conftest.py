from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

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


def waiting_on_a_lock(manifest: Manifest, deadline: float) -> bool:
    """Whether another session of this database is blocked on a row lock (polled until then)."""
    with manifest.engine.connect() as conn:
        while time.monotonic() < deadline:
            n = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
            conn.rollback()  # a fresh snapshot of the activity view next time
            if n:
                return True
    return False
