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
import os
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
from tests.api.conftest import PART
from tests.conftest import (
    create_pg_database,
    drop_pg_database,
    migrate,
    require_postgres,
    s3_options,
)
from uploader.digest import checksum, crc32c_of
from uploader.errors import RetryableStorageError
from uploader.manifest.repo import utcnow
from uploader.states import COMMIT_TRANSITIONS, SEGMENT_TRANSITIONS, CommitState, SegmentState
from uploader.storage import (
    Fault,
    FaultyStorage,
    RetryingStorage,
    RetryPolicy,
    open_storage,
)

MAX_SEGMENTS = 5
LATER = timedelta(minutes=10)  # each restart happens this much later: dead leases have expired


class Crash(BaseException):
    """The process dies inside a remote call: not an Exception, so nothing in the library catches it."""


@dataclass
class Backend:
    manifest_url: str
    remote: tuple[str, dict[str, Any]]
    cleanup: Callable[[], None]
    conditional_delete: bool  # whether the remote honours If-Match on delete (our probe says)


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
RECOVER_OPS = (
    "list_parts",
    "start_upload",
    "upload_part",
    "complete",
    "put",
    "head",
    "delete_if_match",
)
SWEEP_OPS = ("list_uploads", "abort")
# How the model changes committed bytes, and the words the segment's failure reason must hold.
REWRITES = {
    "in-place": "changed after they were committed",
    "new-inode": "replaced by another file",
    "truncated": "changed after they were committed",
}
FOREIGN = "does not match the local bytes"
appends = st.tuples(st.integers(0, 3), st.integers(0, PART - 1), st.integers(0, 2**32 - 1))


class UploaderModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = MAKE_BACKEND["make"]()
        self.tmp = Path(tempfile.mkdtemp(prefix="uploader-model-"))
        url, options = self.backend.remote
        # An independent reader and writer of the remote (plain fsspec), one per example.
        self.reader, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
        self.root = root.rstrip("/")
        # The model.
        self.local: dict[str, bytearray] = {}
        self.paths: dict[str, Path] = {}
        self.sealed: set[str] = set()  # seal() was called
        self.verified_by_seal: set[str] = set()  # seal() returned a result
        # Keys this model fouled on purpose, with the words their failure reason must hold.
        self.fouled: dict[str, str] = {}
        self.before: dict[str, bytes] = {}  # a rewritten key's bytes before its rewrite
        self.foreign: dict[str, bytes] = {}  # a foreign object that must stay untouched
        self.overwritten: dict[str, bytes] = {}  # other bytes over our complete, unverified object
        # The process.
        self.epoch = 0
        self.injected: list[BaseException] = []
        self.segs: dict[str, uploader.Segment] = {}
        self.held: list[FaultyStorage] = []  # network layers whose late calls were not delivered
        self.store = self._open()

    # --- the process ------------------------------------------------------------------------------

    def _open(self) -> uploader.Store:
        url, options = self.backend.remote
        # Two fault layers: ``network`` under the retry layer holds late calls (the caller times
        # out, the retry goes out, the first copy lands later); ``faulty`` over it injects the
        # errors and crashes the caller sees.
        self.network = FaultyStorage(
            open_storage(url, dict(options), min_part_size=PART, retry=None)
        )
        self.delivered = False  # once released, a late call on this layer would land at once
        retrying = RetryingStorage(self.network, RetryPolicy(attempts=3, base=0.0, cap=0.0))
        self.faulty = FaultyStorage(retrying)
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
        # Closing the storage releases the dead process's held requests: they land now.
        self.store.abandon()
        self._deliver()
        self.epoch += 1
        self.segs = {}
        self.store = self._open()

    def _deliver(self) -> None:
        """Every held late call reaches the remote; wait until each was applied."""
        self.network.clear()
        for layer in [*self.held, self.network]:
            if layer.late:
                event("late call delivered")
            layer.release()
            assert layer.wait_applied(120), "a late call was never applied"
        self.held = []
        self.delivered = True

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

    def _expected_failure(self, exc: BaseException) -> bool:
        """A segment this model fouled failing, with the reason the model expects."""
        if not isinstance(exc, uploader.UploaderError):
            return False
        return any(k in str(exc) and w in str(exc) for k, w in self._failing().items())

    def _run(self, fault: tuple[str, str, str] | None, call: Callable[[], Any]) -> Any:
        """Run ``call`` with ``fault`` armed. An injected crash kills the process; an injected
        error, or the failure of a key the model fouled, is the caller's to see; anything else
        is a failure of the code under test."""
        self._arm(fault)
        fired = len(self.faulty.injected)
        try:
            result = call()
        except BaseException as exc:
            if not (self._injected(exc) or self._expected_failure(exc)):
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

    def _clean(self, key: str) -> bool:
        """Not fouled in any way by the model (yet)."""
        return key not in self.fouled and key not in self.overwritten and bool(self.local[key])

    def _failing(self) -> dict[str, str]:
        """Keys the model expects to end ``failed``, with words of the reason."""
        out = dict(self.fouled)
        if not self.backend.conditional_delete:
            out.update((k, FOREIGN) for k in self.overwritten)
        return out

    def _states(self) -> dict[str, SegmentState]:
        return {r.key: r.state for r in self.store.manifest.segments()}

    def _write(self, key: str, append: tuple[int, int, int]) -> None:
        parts, tail, seed = append
        data = random.Random(seed).randbytes(parts * PART + tail)
        with self.paths[key].open("ab") as f:
            f.write(data)
        self.local[key] += data

    def _put_other(self, key: str, data: bytes) -> None:
        """Write an object at ``key`` with plain fsspec, behind the uploader's back."""
        target = f"{self.root}/{key}"
        self.reader.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.reader.pipe_file(target, data)
        self.reader.invalidate_cache()

    def _rewritable(self) -> list[str]:
        """Clean keys, not verified nor failed, with at least one part the remote acknowledged."""
        m = self.store.manifest
        out = []
        for rec in m.segments():
            if rec.state in (SegmentState.VERIFIED, SegmentState.FAILED) or not self._clean(
                rec.key
            ):
                continue
            if any(c.state is CommitState.UPLOADED for c in m.commits(rec.id)):
                out.append(rec.key)
        return sorted(out)

    def _keys_in(self, state: SegmentState) -> list[str]:
        return sorted(k for k, s in self._states().items() if s is state and self._clean(k))

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
        try:
            seg = self._segment(key)
        except uploader.UploaderError as exc:
            if not self._expected_failure(exc):
                raise
            event("a fouled segment refused at registration")
            return
        if not seal:

            def commit() -> Any:
                res = seg.commit().result(timeout=120)
                assert res.committed % PART == 0 and res.committed <= len(self.local[key]), res
                assert res.carried_bytes == len(self.local[key]) - res.committed, res
                return res

            self._run(fault, commit)
            return
        if self._states()[key] is SegmentState.OPEN:
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
                self._check_failed(report)
        else:
            sweep = lambda: self.store.sweep(older_than=0)  # noqa: E731
            self._run(data.draw(faults(*SWEEP_OPS), label="fault"), sweep)

    @precondition(lambda self: bool(self._rewritable()))
    @rule(data=st.data(), how=st.sampled_from(sorted(REWRITES)), offset=st.integers(0, PART - 1))
    def rewrite(self, data: st.DataObject, how: str, offset: int) -> None:
        """Bytes of a segment change behind the uploader's back after some were uploaded."""
        key = data.draw(st.sampled_from(self._rewritable()), label="key")
        m = self.store.manifest
        rec = m.segment(key)
        assert rec is not None
        uploaded = [c for c in m.commits(rec.id) if c.state is CommitState.UPLOADED]
        c = data.draw(st.sampled_from(uploaded), label="part")
        at = c.start + offset % (c.end - c.start)  # a byte the remote acknowledged
        old = bytes(self.local[key])
        new = bytearray(old)
        path = self.paths[key]
        if how == "in-place":
            n = min(100, len(old) - at)
            new[at : at + n] = bytes(b ^ 0xFF for b in old[at : at + n])
            with path.open("r+b") as f:
                f.seek(at)
                f.write(new[at : at + n])
        elif how == "new-inode":
            new[at] ^= 0xFF
            tmp = path.with_name(path.name + ".new")
            tmp.write_bytes(bytes(new))
            os.replace(tmp, path)
        else:  # truncated, then re-extended to the same size with other bytes
            new[at:] = bytes(b ^ 0x5A for b in old[at:])
            with path.open("r+b") as f:
                f.truncate(at)
                f.seek(at)
                f.write(new[at:])
        self.before[key] = old
        self.local[key] = new
        self.fouled[key] = REWRITES[how]
        event(f"rewrite {how} of a {rec.state.value} segment")

    def _foreign_keys(self) -> list[str]:
        return [
            r.key
            for r in self.store.manifest.segments()
            if r.state is SegmentState.SEALED and r.key in self.sealed and self._clean(r.key)
        ]

    @precondition(lambda self: bool(self._foreign_keys()))
    @rule(data=st.data())
    def foreign_object(self, data: st.DataObject) -> None:
        """Someone else writes an object of the same size, other bytes, at a sealed segment's key
        where nothing is yet: it is not ours, the segment fails and the object is left alone."""
        keys = self._foreign_keys()
        key = data.draw(st.sampled_from(keys), label="key")
        if self._visible(key) is not None:
            # Our complete object is there already: another object now would overwrite it, and
            # whether it came before or after ours could not be told. Not modelled.
            event("foreign object: skipped, ours is complete")
            return
        other = bytes(b ^ 0x5A for b in self.local[key])
        self._put_other(key, other)
        self.foreign[key] = other
        self.fouled[key] = FOREIGN
        event("foreign object written")

    @precondition(lambda self: bool(self._keys_in(SegmentState.UPLOADED)))
    @rule(data=st.data(), late=st.booleans())
    def overwrite(self, data: st.DataObject, late: bool) -> None:
        """Other bytes replace our complete, not yet verified object (a corruption we can tell
        apart: the manifest says ``uploaded`` and the remote holds our bytes). Recovery removes
        exactly that object and uploads again; with ``late``, its conditional delete is held in
        the network past the retry and lands later (``deliver``, or when the process dies)."""
        keys = [k for k in self._keys_in(SegmentState.UPLOADED) if k in self.sealed]
        if not keys:
            return
        key = data.draw(st.sampled_from(keys), label="key")
        if self._visible(key) != bytes(self.local[key]):
            event("overwrite: skipped, our object is not what is at the key")
            return
        bad = bytes(b ^ 0x5A for b in self.local[key])
        self._put_other(key, bad)
        self.overwritten[key] = bad
        if late and not self.delivered:
            self.network.add(Fault(op="delete_if_match", kind="late", times=1))
        event(f"overwrite{' with a late delete armed' if late else ''}")

    @precondition(lambda self: any(layer.late for layer in [*self.held, self.network]))
    @rule()
    def deliver(self) -> None:
        """The network delivers every held request."""
        self._deliver()

    # --- invariants -------------------------------------------------------------------------------

    def _visible(self, key: str) -> bytes | None:
        path = f"{self.root}/{key}"
        self.reader.invalidate_cache()
        if not self.reader.exists(path):
            return None
        data: bytes = self.reader.cat_file(path)
        return data

    def _check_failed(self, report: uploader.RecoveryReport) -> None:
        failing = self._failing()
        for key, reason in report.failed:
            assert key in failing and failing[key] in reason, (key, reason)

    @invariant()
    def nothing_partial_ever_visible(self) -> None:
        m = self.store.manifest
        records = {r.key: r for r in m.segments()}
        assert set(records) == set(self.local)
        failing = self._failing()
        for key, local in self.local.items():
            rec = records[key]
            seen = self._visible(key)
            if rec.state is SegmentState.FAILED:
                # Only a key the model fouled, with a reason naming what it did.
                assert key in failing and rec.reason and failing[key] in rec.reason, rec
            if key in self.fouled:
                assert rec.state is not SegmentState.VERIFIED, rec
            if key in self.foreign:
                assert seen == self.foreign[key], f"{key}: the foreign object was touched"
            elif key in self.before:
                # Whatever is there was complete before the change; never the changed bytes.
                assert seen is None or seen == self.before[key], f"{key}: changed bytes shipped"
            elif key in self.overwritten:
                assert seen in (None, bytes(local), self.overwritten[key]), key
            elif key not in self.sealed:
                assert rec.state is SegmentState.OPEN, rec
                assert seen is None, f"{key}: {len(seen or b'')} bytes visible before its seal"
            else:
                assert seen is None or seen == bytes(local), f"{key}: partial or wrong object"
            if key not in self.sealed:
                assert rec.state in (SegmentState.OPEN, SegmentState.FAILED), rec
            else:
                assert rec.state is not SegmentState.OPEN, rec
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
            # A commit holds the checksums of the bytes as they were when it was recorded.
            versions = [bytes(self.local[rec.key])]
            if rec.key in self.before:
                versions.append(self.before[rec.key])
            pos = 0
            for number, c in enumerate(m.commits(rec.id), start=1):
                assert (c.part_number, c.start) == (number, pos), (rec.key, c)
                # Both checksums where an MD5 was taken; the crc32c checksum mode takes none.
                assert any(
                    c.crc32c == crc32c_of(v[c.start : c.end])
                    and c.md5 in (None, checksum(v[c.start : c.end])[0])
                    for v in versions
                ), (rec.key, rec.checksum, c)
                assert (c.md5 is None) == (rec.checksum == "crc32c"), (rec.key, c)
                pos = c.end
            assert pos <= len(versions[0]), rec.key
            if rec.state not in (SegmentState.OPEN, SegmentState.FAILED):
                assert pos == len(versions[0]) == rec.size, (rec.key, pos, rec.size)

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
        if self.fouled or self.overwritten:
            event(f"fouled keys: {len(self.fouled)}, overwritten: {len(self.overwritten)}")
        self._crash()  # a restarted writer, later; held requests have landed
        failing = self._failing()
        for key in self._open_keys():
            self.sealed.add(key)
            # The writer reseals; whatever it leaves unfinished is recovery's.
            try:
                exc = self._segment(key).seal().exception(timeout=120)
            except uploader.UploaderError as refused:
                exc = refused
            if key in failing:
                assert exc is not None and failing[key] in str(exc), (key, exc)

        def done() -> bool:
            return all(
                (s is SegmentState.FAILED) == (k in failing) and s in END
                for k, s in self._states().items()
            )

        for _ in range(5):
            report = self.store.recover()
            self._check_failed(report)
            if done():
                break
        assert done(), self._states()
        assert self.store.recover().resumed == 0  # idempotent: nothing left to do
        self.store.sweep(older_than=0)
        assert self.store.storage.list_uploads() == []
        self.nothing_partial_ever_visible()
        m = self.store.manifest
        for key, local in self.local.items():
            rec = m.segment(key)
            assert rec is not None
            if key in failing:
                assert rec.state is SegmentState.FAILED and failing[key] in (rec.reason or ""), rec
                check_trail(m.events(rec.id), rec.id, "failed")
                continue
            assert rec.state is SegmentState.VERIFIED, rec
            assert self._visible(key) == bytes(local), key
            assert {c.state for c in m.commits(rec.id)} <= {CommitState.VERIFIED}
            check_trail(m.events(rec.id), rec.id, "verified")


END = (SegmentState.VERIFIED, SegmentState.FAILED)


def check_trail(events: list[uploader.Event], segment_id: int, end: str) -> None:
    """The segment's and each commit's events chain (from = previous to) through allowed moves,
    from creation (from None) to ``end`` (a failed segment's commits never verified)."""
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
    assert last.get(None) == end, last
    commits = [state for row, state in last.items() if row is not None]
    if end == "verified":
        assert all(state == "verified" for state in commits), last
    else:
        assert "verified" not in commits, last


SETTINGS = settings(
    max_examples=12,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


PROBED: dict[str, bool] = {}


def probe(url: str, options: dict[str, Any]) -> bool:
    """What the library's own probe says of this kind of remote (asked once per scheme)."""
    scheme = url.split("://", 1)[0]
    if scheme not in PROBED:
        storage = open_storage(url, dict(options), min_part_size=PART)
        try:
            PROBED[scheme] = storage.conditional_delete()
        finally:
            storage.close()
    return PROBED[scheme]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite-file", "postgresql-s3"])
def test_model(
    backend: str, moto_endpoint: str, sqlite_at_head: Path, request: pytest.FixtureRequest
) -> None:
    # Each example starts on a copy of a manifest migrated once (tests/conftest.py).
    template: str | None = None
    if backend == "postgresql-s3":
        require_postgres()
        template = request.getfixturevalue("pg_at_head")

    def make() -> Backend:
        if backend == "sqlite-file":
            base = Path(tempfile.mkdtemp(prefix="uploader-model-db-"))
            (base / "remote").mkdir()
            shutil.copyfile(sqlite_at_head, base / "manifest.db")
            return Backend(
                f"sqlite:///{base}/manifest.db",
                (f"file://{base}/remote", {}),
                lambda: shutil.rmtree(base, ignore_errors=True),
                probe(f"file://{base}/remote", {}),
            )
        import boto3

        url = create_pg_database(template)
        bucket = f"model-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=moto_endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        remote = (f"s3://{bucket}/root", s3_options(moto_endpoint))
        return Backend(url, remote, lambda: drop_pg_database(url), probe(*remote))

    MAKE_BACKEND["make"] = make
    run_state_machine_as_test(UploaderModel, settings=SETTINGS)


def test_foreign_object_at_a_multipart_key_fails_the_segment(tmp_path: Path) -> None:
    """Found by the state machine's ``foreign_object`` rule: a completion that meets an object
    at the key must look at it (it used to complete again, 64 times, and stay sealed)."""
    (tmp_path / "remote").mkdir()
    url, manifest = f"file://{tmp_path}/remote", f"sqlite:///{tmp_path}/m.db"
    migrate(manifest)
    path = tmp_path / "seg"
    data = random.Random(0).randbytes(PART + 724)  # two parts: a multipart seal
    path.write_bytes(data)
    faulty = FaultyStorage(open_storage(url, {}, min_part_size=PART))
    faulty.add(Fault(op="start_upload", times=1))  # the seal is recorded, nothing is sent
    with uploader.open(manifest, url, storage=faulty, part_size=PART, min_part_size=PART) as store:
        assert store.segment("k/0", path).seal().exception(timeout=60) is not None
        fs, root = fsspec.core.url_to_fs(url)
        other = bytes(b ^ 0x5A for b in data)
        fs.makedirs(f"{root}/k", exist_ok=True)
        fs.pipe_file(f"{root}/k/0", other)  # same size, other bytes, nothing of ours there
        report = store.recover()
        rec = store.manifest.segment("k/0")
        assert rec is not None and fs.cat_file(f"{root}/k/0") == other  # left alone (holds)
        assert rec.state is SegmentState.FAILED, (rec.state, rec.last_error, report)
        assert FOREIGN in (rec.reason or "")
