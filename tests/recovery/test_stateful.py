"""A model-based hypothesis state machine over the real stack, checked against its own model.

Rules: create segment files, append to them (0..3 whole parts and a random tail), commit and seal
(maybe with a fault armed on a random remote call, before or after it takes effect, raising a
retryable error or a ``Crash`` that kills the process), crash (the store is abandoned as a dying
process leaves it and a new worker opens one later, past the dead one's leases), recover and sweep
(both maybe with a fault armed too). Runs on (SQLite manifest, file remote) and (PostgreSQL
manifest, moto S3 remote), each example on a fresh database and a fresh bucket.

The model is independent of the manifest: the local bytes of every key, and which keys had
``seal()`` called (a seal records its final commit before any remote call, so those are sealed
whatever fault struck). After every step:

* a key never sealed is ``open`` in the manifest and nothing is visible at it (a plain fsspec
  reader, not our storage layer, looks);
* a sealed key shows either nothing or exactly its local bytes (never a partial object);
* a verified segment's object equals its local file; ``deletable()`` is exactly the verified ones;
* a successful ``seal()`` left its segment verified; nothing is ever ``failed``;
* the recorded commits cover ``[0, end)`` contiguously, within the local file (all of it once
  sealed), with the checksums of the local bytes.

At the end a restarted writer seals what is open, recovery runs until it reports ok, the sweep
runs: every segment is verified and byte-identical, no multipart upload is left under the root, a
second recovery pass finds nothing, and each row's audit trail is a path through the state machine
of ``uploader.states``.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import fsspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import uploader
from tests.api.conftest import PART, migrate
from tests.conftest import create_pg_database, drop_pg_database, require_postgres, s3_options
from uploader.digest import checksum
from uploader.errors import RetryableStorageError
from uploader.manifest.repo import utcnow
from uploader.states import COMMIT_TRANSITIONS, SEGMENT_TRANSITIONS, CommitState, SegmentState
from uploader.storage import Fault, FaultyStorage, open_storage

MAX_SEGMENTS = 5
LATER = timedelta(minutes=10)  # each restart happens this much later: dead leases have expired


class Crash(BaseException):
    """The process dies inside a remote call: not an Exception, so nothing in the library catches it."""


@dataclass
class Backend:
    manifest_url: str
    remote: tuple[str, dict[str, Any]]
    cleanup: Callable[[], None]


# Set by the test function before the machine runs (the session's moto endpoint lives there).
MAKE_BACKEND: dict[str, Callable[[], Backend]] = {}


def faults(*ops: str) -> st.SearchStrategy[tuple[str, str, str] | None]:
    """No fault, or one on a remote call the step makes: before or after it took effect."""
    return st.none() | st.tuples(
        st.sampled_from(ops),
        st.sampled_from(["before", "after"]),
        st.sampled_from(["error", "crash"]),
    )


SEAL_OPS = ("start_upload", "upload_part", "complete", "put", "head")
RECOVER_OPS = ("list_parts", "start_upload", "upload_part", "complete", "put", "head", "delete")
SWEEP_OPS = ("list_uploads", "abort")
appends = st.tuples(st.integers(0, 3), st.integers(0, PART - 1), st.integers(0, 2**32 - 1))


class UploaderModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = MAKE_BACKEND["make"]()
        self.tmp = Path(tempfile.mkdtemp(prefix="uploader-model-"))
        migrate(self.backend.manifest_url)
        url, options = self.backend.remote
        # An independent reader of the remote (plain fsspec), one per example.
        self.reader, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
        self.root = root.rstrip("/")
        # The model.
        self.local: dict[str, bytearray] = {}
        self.paths: dict[str, Path] = {}
        self.sealed: set[str] = set()  # seal() was called
        self.verified_by_seal: set[str] = set()  # seal() returned a result
        # The process.
        self.epoch = 0
        self.injected: list[BaseException] = []
        self.segs: dict[str, uploader.Segment] = {}
        self.store = self._open()

    # --- the process ------------------------------------------------------------------------------

    def _open(self) -> uploader.Store:
        url, options = self.backend.remote
        self.faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
        store = uploader.open(
            self.backend.manifest_url,
            url,
            storage=self.faulty,
            part_size=PART,
            min_part_size=PART,
            worker=f"model-{self.epoch}-{uuid.uuid4().hex[:6]}",
        )
        shift = LATER * self.epoch
        store.manifest.clock = lambda: utcnow() + shift
        return store

    def _crash(self) -> None:
        self.store.abandon()
        self.epoch += 1
        self.segs = {}
        self.store = self._open()

    def _segment(self, key: str) -> uploader.Segment:
        """The writer's handle; after a restart the writer takes its open segment back."""
        if key not in self.segs:
            self.segs[key] = self.store.segment(key, self.paths[key])
        return self.segs[key]

    def _arm(self, fault: tuple[str, str, str] | None) -> None:
        self.faulty.clear()
        if fault is None:
            return
        op, when, kind = fault

        def make() -> BaseException:
            exc: BaseException = (
                Crash(f"crash in {op} ({when})")
                if kind == "crash"
                else RetryableStorageError(f"injected: {op} ({when})")
            )
            self.injected.append(exc)
            return exc

        self.faulty.add(Fault(op=op, when=when, error=make, times=1))  # type: ignore[arg-type]

    def _injected(self, exc: BaseException | None) -> bool:
        """Whether ``exc`` is (caused by) a fault we injected."""
        while exc is not None:
            if any(exc is e for e in self.injected):
                return True
            exc = exc.__cause__ or exc.__context__
        return False

    def _run(self, fault: tuple[str, str, str] | None, call: Callable[[], Any]) -> Any:
        """Run ``call`` with ``fault`` armed. An injected crash kills the process; an injected
        error is the caller's to see; anything else is a failure of the code under test."""
        self._arm(fault)
        fired = len(self.faulty.injected)
        try:
            result = call()
        except BaseException as exc:
            if not self._injected(exc):
                raise
            result = exc
        finally:
            self.faulty.clear()
        if fault is not None:
            event(f"fault {'fired' if len(self.faulty.injected) > fired else 'not reached'}")
        if isinstance(result, Crash):
            self._crash()
        return result

    def _open_keys(self) -> list[str]:
        return sorted(k for k in self.local if k not in self.sealed)

    def _write(self, key: str, append: tuple[int, int, int]) -> None:
        parts, tail, seed = append
        data = random.Random(seed).randbytes(parts * PART + tail)
        with self.paths[key].open("ab") as f:
            f.write(data)
        self.local[key] += data

    # --- rules ------------------------------------------------------------------------------------

    @initialize(append=appends)
    def first(self, append: tuple[int, int, int]) -> None:
        self.create(append)

    @precondition(lambda self: len(self.local) < MAX_SEGMENTS)
    @rule(append=appends)
    def create(self, append: tuple[int, int, int]) -> None:
        key = f"model/{len(self.local):04d}"
        self.paths[key] = self.tmp / key.replace("/", "-")
        self.paths[key].write_bytes(b"")
        self.local[key] = bytearray()
        self._write(key, append)
        self._segment(key)

    @precondition(lambda self: bool(self._open_keys()))
    @rule(data=st.data(), append=appends)
    def append(self, data: st.DataObject, append: tuple[int, int, int]) -> None:
        self._write(data.draw(st.sampled_from(self._open_keys()), label="key"), append)

    @precondition(lambda self: bool(self._open_keys()))
    @rule(data=st.data(), seal=st.booleans(), fault=faults(*SEAL_OPS))
    def ship(self, data: st.DataObject, seal: bool, fault: tuple[str, str, str] | None) -> None:
        """The writer commits what it appended, or seals the segment."""
        key = data.draw(st.sampled_from(self._open_keys()), label="key")
        seg = self._segment(key)
        if not seal:

            def commit() -> Any:
                res = seg.commit().result(timeout=120)
                assert res.committed % PART == 0 and res.committed <= len(self.local[key]), res
                assert res.carried_bytes == len(self.local[key]) - res.committed, res
                return res

            self._run(fault, commit)
            return
        self.sealed.add(key)  # recorded before any remote call, whatever strikes after

        def seal_it() -> Any:
            res = seg.seal().result(timeout=120)
            assert res.sealed and res.verified and res.committed == len(self.local[key]), res
            return res

        if isinstance(self._run(fault, seal_it), uploader.CommitResult):
            self.verified_by_seal.add(key)

    @rule(data=st.data(), kind=st.sampled_from(["crash", "recover", "sweep"]))
    def elsewhere(self, data: st.DataObject, kind: str) -> None:
        """The process dies and a new one starts later; or the recovery job or the sweep runs."""
        if kind == "crash":
            self._crash()
        elif kind == "recover":
            report = self._run(data.draw(faults(*RECOVER_OPS), label="fault"), self.store.recover)
            if isinstance(report, uploader.RecoveryReport):
                assert not report.failed, report.failed
        else:
            sweep = lambda: self.store.sweep(older_than=0)  # noqa: E731
            self._run(data.draw(faults(*SWEEP_OPS), label="fault"), sweep)

    # --- invariants -------------------------------------------------------------------------------

    def _visible(self, key: str) -> bytes | None:
        path = f"{self.root}/{key}"
        self.reader.invalidate_cache()
        if not self.reader.exists(path):
            return None
        data: bytes = self.reader.cat_file(path)
        return data

    @invariant()
    def nothing_partial_ever_visible(self) -> None:
        m = self.store.manifest
        records = {r.key: r for r in m.segments()}
        assert set(records) == set(self.local)
        for key, local in self.local.items():
            rec = records[key]
            assert rec.state is not SegmentState.FAILED, rec
            seen = self._visible(key)
            if key not in self.sealed:
                assert rec.state is SegmentState.OPEN, rec
                assert seen is None, f"{key}: {len(seen or b'')} bytes visible before its seal"
            else:
                assert rec.state is not SegmentState.OPEN, rec
                assert seen is None or seen == bytes(local), f"{key}: partial or wrong object"
            if rec.state is SegmentState.VERIFIED:
                assert seen == bytes(local), key
        assert self.verified_by_seal <= {
            k for k, r in records.items() if r.state is SegmentState.VERIFIED
        }
        assert {r.key for r in m.deletable()} == {
            k for k, r in records.items() if r.state is SegmentState.VERIFIED
        }

    @invariant()
    def commits_cover_the_local_bytes(self) -> None:
        m = self.store.manifest
        for rec in m.segments():
            local = bytes(self.local[rec.key])
            pos = 0
            for number, c in enumerate(m.commits(rec.id), start=1):
                assert (c.part_number, c.start) == (number, pos), (rec.key, c)
                assert c.md5 == checksum(local[c.start : c.end])[0], (rec.key, c)
                pos = c.end
            assert pos <= len(local), rec.key
            if rec.state is not SegmentState.OPEN:
                assert pos == len(local) == rec.size, (rec.key, pos, rec.size)

    # --- the end ----------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self._finish()
        finally:
            with contextlib.suppress(Exception):
                self.store.close()
            self.backend.cleanup()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _finish(self) -> None:
        states = sorted({r.state.value for r in self.store.manifest.segments()})
        event(f"states before the end: {', '.join(states) or 'none'}")
        self._crash()  # a restarted writer, later
        for key in self._open_keys():
            self.sealed.add(key)
            # The writer reseals; whatever it leaves unfinished is recovery's.
            self._segment(key).seal().exception(timeout=120)
        for _ in range(5):
            report = self.store.recover()
            assert not report.failed, report.failed
            if report.ok and self.store.status().all_verified:
                break
        assert self.store.status().all_verified, self.store.status()
        assert self.store.recover().resumed == 0  # idempotent: nothing left to do
        self.store.sweep(older_than=0)
        assert self.store.storage.list_uploads() == []
        m = self.store.manifest
        for key, local in self.local.items():
            rec = m.segment(key)
            assert rec is not None and rec.state is SegmentState.VERIFIED, rec
            assert self._visible(key) == bytes(local), key
            assert {c.state for c in m.commits(rec.id)} <= {CommitState.VERIFIED}
            check_trail(m.events(rec.id), rec.id)


def check_trail(events: list[uploader.Event], segment_id: int) -> None:
    """The segment's and each commit's events chain (from = previous to) through allowed moves,
    from creation (from None) to verified."""
    last: dict[int | None, str | None] = {}
    for e in events:
        assert e.segment_id == segment_id, e
        row = e.commit_id
        assert e.from_state == last.get(row), (e, last.get(row))
        if e.from_state is None:
            assert e.to_state == ("open" if row is None else "pending"), e
        elif row is None:
            move = (SegmentState(e.from_state), SegmentState(e.to_state))
            assert move in SEGMENT_TRANSITIONS, e
        else:
            assert (CommitState(e.from_state), CommitState(e.to_state)) in COMMIT_TRANSITIONS, e
        last[row] = e.to_state
    assert last.get(None) == "verified", last
    assert all(state == "verified" for state in last.values()), last


SETTINGS = settings(
    max_examples=12,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql-s3"])
def test_model(backend: str, moto_endpoint: str) -> None:
    if backend == "postgresql-s3":
        require_postgres()

    def make() -> Backend:
        if backend == "sqlite-file":
            base = Path(tempfile.mkdtemp(prefix="uploader-model-db-"))
            (base / "remote").mkdir()
            return Backend(
                f"sqlite:///{base}/manifest.db",
                (f"file://{base}/remote", {}),
                lambda: shutil.rmtree(base, ignore_errors=True),
            )
        import boto3

        url = create_pg_database()
        bucket = f"model-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=moto_endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        return Backend(
            url, (f"s3://{bucket}/root", s3_options(moto_endpoint)), lambda: drop_pg_database(url)
        )

    MAKE_BACKEND["make"] = make
    run_state_machine_as_test(UploaderModel, settings=SETTINGS)
