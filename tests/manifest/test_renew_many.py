"""Renewing many leases at once: held ones are extended, lost ones reported, nothing else moves."""

from __future__ import annotations

from datetime import timedelta

from uploader.manifest.repo import Manifest, utcnow


def test_renew_many_reports_lost_leases(manifest: Manifest) -> None:
    now = utcnow()
    manifest.clock = lambda: now
    leases = []
    for i in range(3):
        manifest.register(f"r/{i}", f"/d/{i}", node="n", part_size=4, worker="w")
        leases.append(manifest.acquire(f"r/{i}", "w", ttl=10))
    # r/1 expires and is taken over by another worker; r/2 is released.
    manifest.clock = lambda: now + timedelta(seconds=11)
    manifest.acquire("r/1", "other", ttl=10)
    manifest.clock = lambda: now + timedelta(seconds=5)
    assert manifest.release(leases[2])
    renewed, lost = manifest.renew_many(leases, ttl=60)
    assert [lease.key for lease in renewed] == ["r/0"]
    assert renewed[0].expires == now + timedelta(seconds=65)
    assert sorted(lease.key for lease in lost) == ["r/1", "r/2"]
    taken = manifest.segment("r/1")
    assert taken is not None and taken.lease_owner == "other" and taken.fence == 2
    assert manifest.segment("r/2").lease_owner is None  # type: ignore[union-attr]
