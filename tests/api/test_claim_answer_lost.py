"""A claim that committed but whose answer never came back (the connection died after COMMIT).

The manifest leased the segments to this worker, but no thread of it holds them: without a fix
the segments sit idle until their leases expire (30 s by default), since a claim skips live
leases, our own included. ``recover_loop`` and the watcher's recovery passes give such leases
back once the manifest answers again, so the next pass takes the segments at once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

import uploader
from tests.api.conftest import PART
from tests.api.test_outage_loops import RecordingStop, _run, _sealed_work
from tests.cli.outage_helpers import wait_for
from uploader.manifest import db
from uploader.outage import Backoff
from uploader.records import Lease, SegmentRecord
from uploader.recovery import RecoveryReport, recover_loop
from uploader.states import SegmentState
from uploader.watch import Watcher


def _lost_answer() -> OperationalError:
    # What SQLAlchemy raises when the server ends the connection (pg_terminate_backend,
    # a failover) before the COMMIT's answer arrives: an outage, not an error of ours.
    return OperationalError(
        "COMMIT", {}, Exception("server closed the connection"), connection_invalidated=True
    )


def test_lost_answer_is_an_outage() -> None:
    assert db.is_outage(_lost_answer())


@pytest.mark.parametrize("loop", ["recover_loop", "watcher"])
def test_a_claim_whose_answer_was_lost_does_not_idle_until_its_leases_expire(
    loop: str,
    manifest_url: str,
    at_head: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "uploader")
    remote = f"memory://claim-lost-{uuid.uuid4().hex[:12]}"
    _sealed_work(manifest_url, remote, tmp_path, 3)
    store = uploader.open(manifest_url, remote, part_size=PART, min_part_size=PART)
    assert store.lease_seconds >= 30  # longer than this test waits: expiry cannot rescue it
    manifest = store.crew.manifest
    real_claim = manifest.claim
    lost: list[list[str]] = []
    lock = threading.Lock()

    def claim(*args: Any, **kwargs: Any) -> list[tuple[Lease, SegmentRecord]]:
        got = real_claim(*args, **kwargs)
        with lock:
            if got and not lost:  # the first claim that took anything: committed, answer lost
                lost.append([seg.key for _, seg in got])
                raise _lost_answer()
        return got

    monkeypatch.setattr(manifest, "claim", claim)
    stop = RecordingStop()
    reports: list[RecoveryReport] = []
    try:
        backoff = Backoff(first=0.05, cap=0.2, rng=lambda: 1.0)
        if loop == "recover_loop":
            t, errors = _run(
                lambda: recover_loop(
                    store.crew, interval=0.01, stop=stop, on_report=reports.append, backoff=backoff
                )
            )
        else:  # the watcher's own recovery passes (``uploader watch --recover-every``)
            (tmp_path / "logs").mkdir()
            watcher = Watcher(store, tmp_path / "logs")
            t, errors = _run(
                lambda: watcher.run(
                    interval=0.01,
                    stop=stop,
                    recover_every=0.0,
                    on_recovery=reports.append,
                    backoff=backoff,
                )
            )
        wait_for(
            lambda: sum(len(r.verified) for r in reports) == 3 or errors,
            "every segment verified before the lost claim's leases expire",
            timeout=15,
        )
        stop.set()
        t.join(30)
        counts = {k: n for k, n in store.status().segments.items() if n}
        leased = [s.key for s in store.manifest.segments() if s.lease_owner is not None]
    finally:
        stop.set()
        store.close()
    assert not errors, errors
    assert lost and len(lost[0]) == 3, lost
    assert counts == {SegmentState.VERIFIED.value: 3}
    assert leased == []
    gave_back = [r.getMessage() for r in caplog.records if "held by no thread" in r.getMessage()]
    assert len(gave_back) == 3, gave_back
    assert all(any(key in m for m in gave_back) for key in lost[0])


def test_give_back_unheld_gives_back_only_that_claims_leases_no_thread_holds(
    manifest_url: str, at_head: None, tmp_path: Path
) -> None:
    remote = f"memory://claim-lost-{uuid.uuid4().hex[:12]}"
    _sealed_work(manifest_url, remote, tmp_path, 4)
    store = uploader.open(manifest_url, remote, part_size=PART, min_part_size=PART)
    try:
        m, me, node = store.manifest, store.worker, store.node
        at = datetime(2030, 1, 2, 3, 4, 5, 678901)  # one claim's time, written on its rows
        claimed = {seg.key: lease for lease, seg in m.claim(me, node=node, limit=3, at=at)}
        assert sorted(claimed) == ["k/0", "k/1", "k/2"]
        store.keeper.hold(claimed["k/0"])  # a thread holds this one
        stale = claimed["k/1"]  # and an older lease on this one: lost already, not a holder
        store.keeper.hold(Lease(stale.segment_id, stale.key, me, stale.fence - 1, stale.expires))
        m.acquire("k/3", me, node=node)  # ours, not held, but not taken by that claim
        taken_again = m.acquire("k/2", me, node=node)  # written since the claim: not its row
        assert m.give_back_unheld(me, at, store.keeper.get) == ["k/1"]
        owners = {s.key: s.lease_owner for s in m.segments()}
        assert owners == {"k/0": me, "k/1": None, "k/2": me, "k/3": me}
        assert m.renew(taken_again).fence == taken_again.fence  # still ours, fence unchanged
        assert m.give_back_unheld("someone-else", at, lambda _id: None) == []
    finally:
        store.close()
