"""A hypothesis state machine over the real stack: appends, commits, seals, faults at remote calls
(before and after they take effect), crashes (the store is dropped as a dying process would leave
it), recovery and sweep, in any order.

After every step: nothing is visible at the key of an open segment, and every verified segment's
object equals its local file. At the end, once a restarted writer sealed what was open and recovery
ran: every segment verified and byte-identical, no unfinished upload under the root, and each
segment's audit trail a valid path through the state machine.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import uploader
from tests.api.conftest import PART, migrate, remote_bytes
from tests.conftest import create_pg_database, drop_pg_database, require_postgres, s3_options
from uploader.errors import RetryableStorageError
from uploader.manifest.repo import utcnow
from uploader.states import COMMIT_TRANSITIONS, SEGMENT_TRANSITIONS, CommitState, SegmentState
from uploader.storage import Fault, FaultyStorage, open_storage
from uploader.storage.faults import OPS

SIZES = [1, PART - 1, PART, PART + 1, 2 * PART + 3]
FAULT_OPS = [op for op in OPS if op not in ("list_uploads", "read", "delete")]

# Set by the test function before the machine runs: builds (manifest URL, remote, cleanup).
ENV: dict[str, Callable[[], tuple[str, tuple[str, dict[str, Any]], Callable[[], None]]]] = {}


class Crash(BaseException):
    """The process dies inside a remote call."""


class UploaderMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="uploader-sm-"))
        self.manifest_url, self.remote, self.cleanup = ENV["make"]()
        migrate(self.manifest_url)
        self.epoch = 0
        self.local: dict[str, bytearray] = {}
        self.paths: dict[str, Path] = {}
        self.segs: dict[str, uploader.Segment] = {}
        self.rng = random.Random(0)
        self.store = self._open()

    # --- helpers ----------------------------------------------------------------------------------

    def _open(self) -> uploader.Store:
        url, options = self.remote
        self.faulty = FaultyStorage(
            open_storage(url, dict(options), min_part_size=PART, retry=None)
        )
        store = uploader.open(
            self.manifest_url, url, storage=self.faulty, part_size=PART, min_part_size=PART
        )
        # Each restart happens "later": leases of the dead process have expired by then.
        shift = timedelta(minutes=10 * self.epoch)
        store.manifest.clock = lambda: utcnow() + shift
        return store

    def _state(self, key: str) -> SegmentState:
        rec = self.store.manifest.segment(key)
        assert rec is not None
        return rec.state

    def _segment(self, key: str) -> uploader.Segment:
        seg = self.segs.get(key)
        if seg is None:
            seg = self.store.segment(key, self.paths[key])
            self.segs[key] = seg
        return seg

    def _arm(self, fault: tuple[str, str, str] | None) -> None:
        self.faulty.clear()
        if fault is None:
            return
        op, when, kind = fault
        make: Callable[[], BaseException] = (
            (lambda: Crash(f"crash in {op}"))
            if kind == "crash"
            else (lambda: RetryableStorageError(f"injected {op} {when}"))
        )
        self.faulty.add(Fault(op=op, when=when, error=make, times=1))  # type: ignore[arg-type]

    def open_keys(self) -> list[str]:
        return [k for k in self.local if self._state(k) is SegmentState.OPEN]

    # --- rules ------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.local) < 6)
    @rule(size=st.sampled_from([0, *SIZES]))
    def new_segment(self, size: int) -> None:
        key = f"sm/{len(self.local):03d}"
        path = self.tmp / key.replace("/", "_")
        data = self.rng.randbytes(size)
        path.write_bytes(data)
        self.paths[key] = path
        self.local[key] = bytearray(data)
        self.segs[key] = self.store.segment(key, path)

    @precondition(lambda self: bool(self.local))
    @rule(pick=st.integers(0, 100), size=st.sampled_from(SIZES))
    def append(self, pick: int, size: int) -> None:
        keys = self.open_keys()
        if not keys:
            return
        key = keys[pick % len(keys)]
        data = self.rng.randbytes(size)
        with self.paths[key].open("ab") as f:
            f.write(data)
        self.local[key] += data

    @precondition(lambda self: bool(self.local))
    @rule(
        pick=st.integers(0, 100),
        seal=st.booleans(),
        fault=st.none()
        | st.tuples(
            st.sampled_from(FAULT_OPS),
            st.sampled_from(["before", "after"]),
            st.sampled_from(["error", "crash"]),
        ),
    )
    def ship(self, pick: int, seal: bool, fault: tuple[str, str, str] | None) -> None:
        keys = self.open_keys()
        if not keys:
            return
        key = keys[pick % len(keys)]
        seg = self._segment(key)
        self._arm(fault)
        try:
            fut = seg.seal() if seal else seg.commit()
            exc = fut.exception(timeout=60)
        except uploader.UploaderError:
            exc = None
        self.faulty.clear()
        if isinstance(exc, Crash):
            self.crash()

    @rule(kind=st.sampled_from(["crash", "recover", "sweep"]))
    def elsewhere(self, kind: str) -> None:
        """The process dies and restarts, the recovery job runs, or the sweep runs."""
        if kind == "crash":
            self.crash()
        elif kind == "recover":
            report = self.store.recover()
            assert not report.failed, report.failed
        else:
            self.store.sweep(older_than=0)

    def crash(self) -> None:
        self.store.abandon()
        self.epoch += 1
        self.segs = {}
        self.store = self._open()

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def nothing_partial_and_verified_means_identical(self) -> None:
        for rec in self.store.manifest.segments():
            if rec.state is SegmentState.OPEN:
                assert self.store.storage.head(rec.key) is None, rec.key
            elif rec.state is SegmentState.VERIFIED:
                assert remote_bytes(self.remote, rec.key) == bytes(self.local[rec.key]), rec.key

    # --- the end ----------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self._finish()
        finally:
            with contextlib.suppress(Exception):
                self.store.close()
            self.cleanup()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _finish(self) -> None:
        self.crash()  # a restarted writer, later
        for key in self.open_keys():
            with contextlib.suppress(uploader.UploaderError):
                self._segment(key).seal().exception(timeout=60)
        for _ in range(3):
            if self.store.recover().ok and self.store.status().all_verified:
                break
        self.store.sweep(older_than=0)
        assert self.store.storage.list_uploads() == []
        m = self.store.manifest
        for key, data in self.local.items():
            rec = m.segment(key)
            assert rec is not None and rec.state is SegmentState.VERIFIED, rec
            assert remote_bytes(self.remote, key) == bytes(data), key
            _check_trail(m.events(rec.id))


def _check_trail(events: list[uploader.Event]) -> None:
    """Each row's events chain (from = previous to) through allowed transitions only."""
    last: dict[int | None, str | None] = {}
    for e in events:
        row = e.commit_id
        previous = last.get(row)
        assert e.from_state == previous, (e, previous)
        if e.from_state is not None:
            table = SEGMENT_TRANSITIONS if row is None else COMMIT_TRANSITIONS
            kind = SegmentState if row is None else CommitState
            assert (kind(e.from_state), kind(e.to_state)) in table, e
        last[row] = e.to_state


@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql-s3"])
def test_state_machine(backend: str, moto_endpoint: str) -> None:
    if backend.startswith("postgresql"):
        require_postgres()

    def make() -> tuple[str, tuple[str, dict[str, Any]], Callable[[], None]]:
        if backend == "sqlite-file":
            base = Path(tempfile.mkdtemp(prefix="uploader-sm-db-"))
            (base / "remote").mkdir()
            return (
                f"sqlite:///{base}/m.db",
                (f"file://{base}/remote", {}),
                lambda: shutil.rmtree(base, ignore_errors=True),
            )
        import boto3

        url = create_pg_database()
        bucket = f"sm-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=moto_endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        return url, (f"s3://{bucket}/sm", s3_options(moto_endpoint)), lambda: drop_pg_database(url)

    ENV["make"] = make
    run_state_machine_as_test(
        UploaderMachine,
        settings=settings(
            max_examples=15,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
