"""An acknowledgement written again while its first write is still committing (the caller gave
up waiting for the answer, e.g. a COMMIT held by a synchronous standby, and tried again): the
retry waits for the first write and then finds nothing new to write. It must not read the part
as ``pending`` before the first write commits and then fail its compare-and-set with a
misleading "moved by another worker". PostgreSQL only: SQLite's write transactions are
exclusive from their start, so the retry cannot begin before the first one ends."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.manifest.conftest import waiting_on_a_lock
from uploader.digest import checksum
from uploader.manifest.repo import Manifest
from uploader.records import NewCommit
from uploader.states import CommitState


def test_a_retry_during_the_first_writes_commit_writes_nothing_and_succeeds(
    manifest: Manifest,
) -> None:
    if manifest.engine.dialect.name != "postgresql":
        pytest.skip("SQLite write transactions are exclusive from BEGIN: no such interleaving")
    key = "race/a"
    manifest.register(key, f"/data/{key}", node="n1", part_size=4, worker="w")
    lease = manifest.acquire(key, "w")
    md5, crc = checksum(b"abcd")
    [c] = manifest.add_commits(lease, [NewCommit(1, 0, 4, md5, crc)])
    # The first write, its transaction still open: the segment row locked, the part uploaded.
    first = manifest._write()
    tx = first.__enter__()
    tx.guard(lease)
    tx.move_commit(lease, c.id, CommitState.PENDING, CommitState.UPLOADED, {"etag": md5})
    result: dict[str, Any] = {}

    def retry() -> None:
        try:
            manifest.parts_uploaded(lease, [(c, md5)])
            result["ok"] = True
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    t = threading.Thread(target=retry)
    t.start()
    try:
        assert waiting_on_a_lock(manifest, time.monotonic() + 30), "the retry never waited"
    finally:
        first.__exit__(None, None, None)  # the first write commits
        t.join(30)
    assert result == {"ok": True}, result
    [after] = manifest.commits(lease.segment_id)
    assert (after.state, after.etag) == (CommitState.UPLOADED, md5)
