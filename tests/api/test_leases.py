"""The store's heartbeat keeps every lease it holds alive, in one transaction per beat."""

from __future__ import annotations

import threading
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
        # Wait for the event "every lease was renewed" (a beat every third of the lease), not
        # for time to pass: the renewals are then in the manifest, past the first expiries.
        deadline = time.monotonic() + 30
        while not all(s.lease.expires > first[s.key] for s in segs):
            assert time.monotonic() < deadline, "the heartbeat renewed no lease in 30 s"
            threading.Event().wait(0.05)
        held = {k: e for k, _, e in store.manifest.leased_unfinished()}
        assert set(held) == set(first)
        assert all(held[k] > first[k] for k in first)  # recorded, not only remembered
        for s in segs:
            assert s.seal().result(timeout=60).verified
        assert store.status().segments["verified"] == 50
