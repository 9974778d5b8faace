"""The store's heartbeat keeps every lease it holds alive, in one transaction per beat."""

from __future__ import annotations

import time
from pathlib import Path

from tests.api.conftest import StoreFactory


def test_heartbeat_renews_many_leases(make_store: StoreFactory, tmp_path: Path) -> None:
    with make_store(lease_seconds=2.0) as store:
        segs = []
        for i in range(50):
            path = tmp_path / f"s{i}"
            path.write_bytes(b"x" * 10)
            segs.append(store.segment(f"hb/{i:02d}", path))
        first = {s.key: s.lease.expires for s in segs}
        time.sleep(4.0)  # well past the original expiry: only renewals keep them
        for s in segs:
            assert s.lease.expires > first[s.key]
        for s in segs:
            assert s.seal().result(timeout=60).verified
        assert store.status().segments["verified"] == 50
