"""``seal_small_many``, the group commit's intents, at the manifest: a key given twice is refused
before anything is written, and two batches that share keys, given in opposite orders, wait for
each other instead of deadlocking (PostgreSQL: each would hold a key the other waits for)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.manifest.conftest import waiting_on_a_lock
from uploader.errors import UsageError
from uploader.manifest.bulk import insert_many
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import SEGMENTS
from uploader.records import SmallSeal


def _items(*keys: str) -> list[SmallSeal]:
    return [SmallSeal(k, f"/data/{k}", 10, None, 7, checksum="crc32c") for k in keys]


def _seal(m: Manifest, items: list[SmallSeal], worker: str = "w") -> list[Any]:
    return m.seal_small_many(items, node="n", part_size=100, worker=worker, lease_ttl=60)


def test_a_key_given_twice_is_refused_before_anything_is_written(manifest: Manifest) -> None:
    with pytest.raises(UsageError, match="'dup/a' is given twice"):
        _seal(manifest, _items("dup/a", "dup/b", "dup/a"))
    with manifest.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(SEGMENTS)).scalar() == 0


def test_batches_sharing_keys_in_opposite_orders_wait_not_deadlock(manifest: Manifest) -> None:
    if not manifest.is_postgres:
        pytest.skip("SQLite write transactions are exclusive from BEGIN: no such interleaving")
    # Batch A, its transaction still open, has inserted "k/a" (and holds it).
    a = manifest._write()
    tx = a.__enter__()
    rows_a: list[Any] = []
    try:
        # Batch B gives the same keys in the opposite order: sorted, it waits for "k/a" first,
        # holding nothing; unsorted it would hold "k/b" while waiting for "k/a".
        result: dict[str, Any] = {}

        def batch_b() -> None:
            try:
                result["rows"] = _seal(manifest, _items("k/b", "k/a"), worker="wb")
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        rows_a = _in(tx, manifest, _items("k/a"))
        t = threading.Thread(target=batch_b)
        t.start()
        assert waiting_on_a_lock(manifest, time.monotonic() + 30), "batch B never waited"
        # Batch A goes on to "k/b": B holds nothing, so A does not wait (no deadlock).
        rows_a += _in(tx, manifest, _items("k/b"))
    finally:
        a.__exit__(None, None, None)  # batch A commits
    t.join(30)
    assert not t.is_alive()
    assert result == {"rows": [None, None]}, result  # both keys are A's: B takes neither
    assert sorted(r.key for r in rows_a) == ["k/a", "k/b"]
    for key in ("k/a", "k/b"):
        rec = manifest.segment(key)
        assert rec is not None and rec.lease_owner == "w"


def _in(tx: Any, manifest: Manifest, items: list[SmallSeal]) -> list[Any]:
    """Segment rows inserted in ``tx`` as ``seal_small_many`` inserts them (its statement)."""
    shared = manifest._born_sealed_shared("n", 100, "w", 60, tx.now)
    return list(
        insert_many(
            tx.conn,
            SEGMENTS,
            shared,
            [manifest._born_sealed(it) for it in items],
            returning=[SEGMENTS.c.key],
            skip_conflicts_on="key",
        )
    )
