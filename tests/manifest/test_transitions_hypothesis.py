"""Random sequences of transition attempts against a model of the manifest, on SQLite and PostgreSQL.

Each example registers a fresh segment (fresh key) in the test's database and plays a random list of
operations: leases taken, renewed, released, taken over by another owner or left to expire (the
clock is injected), forged leases, and every guarded write with any pair of states. A small model
says what must happen; the test checks:

* an attempt succeeds exactly when the transition is allowed, the lease (owner + fence token) is
  current and unexpired and the row is in the expected state;
* a refused attempt raises the specific error (InvalidStateError, LeaseLostError, StaleStateError,
  SegmentSealedError, SegmentBusyError) and changes nothing: not the segment row, not a commit,
  not the audit trail;
* ``events()`` holds exactly the successful transitions, in order, with the worker and fence.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from sqlalchemy import select

from uploader.digest import checksum
from uploader.errors import (
    InvalidStateError,
    LeaseLostError,
    SegmentBusyError,
    SegmentSealedError,
    StaleStateError,
    UploaderError,
)
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import COMMITS as C
from uploader.manifest.rowmap import EVENTS as E
from uploader.manifest.rowmap import SEGMENTS as S
from uploader.records import Lease, NewCommit
from uploader.states import COMMIT_TRANSITIONS, SEGMENT_TRANSITIONS, CommitState, SegmentState

TTL = 10.0
T0 = datetime(2031, 1, 1, 12, 0, 0)
OWNERS = ("alice", "bob")
FORGER = "mallory"  # never takes a lease: a forged lease with the current fence
PART = 4

SEG_ALLOWED = sorted((a.value, b.value) for a, b in SEGMENT_TRANSITIONS)
COMMIT_ALLOWED = sorted((a.value, b.value) for a, b in COMMIT_TRANSITIONS)
SEG_STATES = [s.value for s in SegmentState]
COMMIT_STATES = [s.value for s in CommitState]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


# --- operations ---------------------------------------------------------------------------------

# 0 = the newest lease, 1 = the one before, ... (fence 0 if there is none that old);
# -1 = forged (the current fence, an owner that never held it).
lease_ix = st.one_of(st.just(0), st.integers(-1, 3))
seg_pair = st.one_of(
    st.sampled_from(SEG_ALLOWED),
    st.tuples(st.sampled_from(SEG_STATES), st.sampled_from(SEG_STATES)),
)
commit_pair = st.one_of(
    st.sampled_from(COMMIT_ALLOWED),
    st.tuples(st.sampled_from(COMMIT_STATES), st.sampled_from(COMMIT_STATES)),
)
productive = st.one_of(  # moves that make progress with the newest lease, to reach deep states
    st.tuples(st.just("add"), st.just(0), st.integers(1, 2)),
    st.tuples(st.just("seal"), st.just(0), st.booleans()),
    st.tuples(st.just("segment"), st.just(0), st.sampled_from(SEG_ALLOWED), st.just(True)),
    st.tuples(st.just("uploaded_etag"), st.just(0), st.just(-1), st.just(True)),
    st.tuples(st.just("uploaded_etag"), st.just(0), st.just(-1), st.just(True)),
    st.tuples(st.just("verify"), st.just(0)),
)
operation = st.one_of(
    productive,
    st.tuples(st.just("acquire"), st.sampled_from(OWNERS)),
    st.tuples(st.just("advance"), st.sampled_from([1, 5, 9, 10, 11])),
    st.tuples(st.just("acquire"), st.sampled_from(OWNERS)),
    st.tuples(st.just("release"), lease_ix),
    st.tuples(st.just("renew"), lease_ix),
    st.tuples(st.just("add"), lease_ix, st.integers(1, 2)),
    st.tuples(st.just("seal"), lease_ix, st.booleans()),
    st.tuples(st.just("segment"), lease_ix, seg_pair, st.booleans()),
    st.tuples(st.just("commit"), lease_ix, st.integers(-1, 3), commit_pair, st.booleans()),
    st.tuples(st.just("uploaded_etag"), lease_ix, st.integers(0, 3), st.booleans()),
    st.tuples(st.just("verify"), lease_ix),
    st.tuples(st.just("reupload"), lease_ix),
    st.tuples(st.just("fail"), lease_ix),
    productive,
    productive,
)
stale_ix = st.sampled_from([-1, 1, 2, 3])
# Attempts with old or forged leases (mostly refused) and lease churn, next to the productive moves.
noise = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from(OWNERS)),
    st.tuples(st.just("advance"), st.sampled_from([1, 5, 11])),
    st.tuples(st.just("renew"), st.integers(-1, 3)),
    st.tuples(st.just("add"), stale_ix, st.integers(1, 2)),
    st.tuples(st.just("segment"), stale_ix, st.sampled_from(SEG_ALLOWED), st.just(True)),
    st.tuples(
        st.just("commit"),
        stale_ix,
        st.integers(0, 3),
        st.sampled_from(COMMIT_ALLOWED),
        st.just(True),
    ),
    st.tuples(st.just("verify"), stale_ix),
    st.tuples(st.just("reupload"), stale_ix),
    st.tuples(st.just("fail"), stale_ix),
    st.tuples(st.just("release"), stale_ix),
)
sequences = st.one_of(
    st.lists(operation, min_size=10, max_size=80),
    st.lists(st.one_of(productive, productive, noise), min_size=10, max_size=80),
)


# --- the model ------------------------------------------------------------------------------------

EventKey = tuple[int | None, str | None, str, str, int]  # commit id, from, to, worker, fence


@dataclass
class Model:
    seg_id: int
    key: str
    state: str = "open"
    size: int | None = None
    fence: int = 0
    owner: str | None = None
    expires: datetime | None = None
    end: int = 0
    commits: list[list[Any]] = field(default_factory=list)  # [id, state, md5]
    leases: list[Lease] = field(default_factory=list)
    events: list[EventKey] = field(default_factory=list)

    def valid(self, lease: Lease, now: datetime) -> bool:
        return (
            lease.fence == self.fence
            and lease.owner == self.owner
            and self.expires is not None
            and self.expires > now
        )

    def lease(self, ix: int, now: datetime) -> Lease:
        if ix < 0 or not self.leases:
            return Lease(self.seg_id, self.key, FORGER, self.fence, now + timedelta(seconds=TTL))
        if ix >= len(self.leases):  # a token older than any handed out: never valid
            return Lease(self.seg_id, self.key, OWNERS[0], 0, now + timedelta(seconds=TTL))
        return self.leases[-1 - ix]


def snapshot(m: Manifest, seg_id: int) -> tuple[Any, ...]:
    with m.engine.connect() as conn:
        seg = tuple(conn.execute(select(S).where(S.c.id == seg_id)).one())
        commits = [
            tuple(r)
            for r in conn.execute(select(C).where(C.c.segment_id == seg_id).order_by(C.c.id))
        ]
        events = [
            tuple(r)
            for r in conn.execute(select(E).where(E.c.segment_id == seg_id).order_by(E.c.id))
        ]
    return seg, commits, events


def event_keys(m: Manifest, seg_id: int) -> list[EventKey]:
    return [(e.commit_id, e.from_state, e.to_state, e.worker, e.fence) for e in m.events(seg_id)]


def new_part(number: int, start: int) -> NewCommit:
    data = f"{number:04d}".encode()[:PART]
    md5, crc = checksum(data)
    return NewCommit(number, start, start + PART, md5, crc)


def play(m: Manifest, model: Model, clock: Clock, op: tuple[Any, ...]) -> None:
    """Run one operation; check the outcome against the model; update the model."""
    kind = op[0]
    now = clock.now
    if kind == "advance":
        clock.now = now + timedelta(seconds=op[1])
        return

    before = snapshot(m, model.seg_id)
    n_events = len(before[2])
    expected: type[Exception] | None = None
    new_events: list[EventKey] = []
    sort_tail = False  # events of one statement over several commits: their order is the DB's
    result: Any = None

    if kind == "acquire":
        owner = op[1]
        free = model.owner is None or model.owner == owner
        free = free or (model.expires is not None and model.expires < now)
        expected = None if free else SegmentBusyError
        call: Any = lambda: m.acquire(model.key, owner, ttl=TTL)  # noqa: E731
    else:
        lease = model.lease(op[1], now)
        valid = model.valid(lease, now)

        if kind == "release":
            call = lambda: m.release(lease)  # noqa: E731
        elif kind == "renew":
            expected = None if valid else LeaseLostError
            call = lambda: m.renew(lease, ttl=TTL)  # noqa: E731
        elif kind == "add":
            parts = [
                new_part(len(model.commits) + 1 + i, model.end + i * PART) for i in range(op[2])
            ]
            expected = (
                LeaseLostError
                if not valid
                else SegmentSealedError
                if model.state != "open"
                else None
            )
            call = lambda: m.add_commits(lease, parts)  # noqa: E731
        elif kind == "seal":
            final = [new_part(len(model.commits) + 1, model.end)] if op[2] else []
            size = model.end + PART * len(final)
            expected = (
                LeaseLostError
                if not valid
                else SegmentSealedError
                if model.state != "open"
                else None
            )
            call = lambda: m.seal(  # noqa: E731
                lease, final, size=size, crc32c=7, expected_etag="e" * 32, upload_mode="multipart"
            )
        elif kind == "segment":
            (src, dst), with_reason = op[2], op[3]
            reason = "because" if with_reason else None
            if (src, dst) not in SEG_ALLOWED or (dst == "failed" and not reason):
                expected = InvalidStateError
            elif dst in ("sealed", "verified") and model.size is None:
                expected = InvalidStateError  # no size and checksum recorded
            elif dst == "verified" and any(c[1] != "uploaded" for c in model.commits):
                expected = InvalidStateError  # the same path as segment_verified: commits first
            elif not valid:
                expected = LeaseLostError
            elif model.state != src:
                expected = StaleStateError
            elif dst == "uploaded" and any(
                c[1] not in ("uploaded", "verified") for c in model.commits
            ):
                expected = InvalidStateError  # "object complete" with a part never acknowledged
            call = lambda: m.transition_segment(lease, src, dst, reason=reason)  # noqa: E731
        elif kind == "commit":
            ix, (src, dst), given_ = op[2], op[3], op[4]
            # -1: a commit id that does not exist (or belongs to no segment of ours)
            target = model.commits[ix % len(model.commits)] if ix >= 0 and model.commits else None
            commit_id = target[0] if target is not None else 10**9
            etag = (target[2] if target is not None else "0" * 32) if given_ else None
            reason = "why" if given_ else None
            if (
                (src, dst) not in COMMIT_ALLOWED
                or (dst == "uploaded" and etag is None)
                or (dst == "failed" and not reason)
            ):
                expected = InvalidStateError
            elif not valid:
                expected = LeaseLostError
            elif target is None or target[1] != src:
                expected = StaleStateError
            call = lambda: m.transition_commit(  # noqa: E731
                lease, commit_id, src, dst, etag=etag, reason=reason
            )
        elif kind == "uploaded_etag":
            # commit_uploaded refuses an ETag that is not the part's MD5 before touching anything.
            if not model.commits:
                return
            ix, right = op[2], op[3]
            if ix < 0:  # the first pending part, if any
                ix = next((i for i, c in enumerate(model.commits) if c[1] == "pending"), 0)
            record = m.commits(model.seg_id)[ix % len(model.commits)]
            etag = record.md5 if right else "f" * 32
            if not right:
                expected = StaleStateError
            elif not valid:
                expected = LeaseLostError
            elif record.state is CommitState.UPLOADED and record.etag == etag:
                pass  # written again (an answer lost, tried again): no news, nothing changes
            elif record.state is not CommitState.PENDING:
                expected = StaleStateError
            call = lambda: m.commit_uploaded(lease, record, etag)  # noqa: E731
        elif kind == "verify":
            if any(c[1] != "uploaded" for c in model.commits):
                expected = InvalidStateError
            elif not valid:
                expected = LeaseLostError
            elif model.state != "uploaded":
                expected = StaleStateError
            call = lambda: m.segment_verified(lease, "checked")  # noqa: E731
        elif kind == "reupload":
            if not valid:
                expected = LeaseLostError
            elif model.state != "uploaded":
                expected = StaleStateError
            call = lambda: m.reupload(lease, "etag mismatch")  # noqa: E731
        elif kind == "fail":
            if model.state == "failed":
                expected = InvalidStateError
            elif not valid:
                expected = LeaseLostError
            call = lambda: m.fail_segment(lease, "local file vanished")  # noqa: E731
        else:  # pragma: no cover
            raise AssertionError(kind)

    if currently_in_test_context():  # statistics: pytest --hypothesis-show-statistics
        event(f"{kind}: {'ok' if expected is None else expected.__name__}")
    try:
        result = call()
        raised: Exception | None = None
    except UploaderError as exc:
        raised = exc
    if expected is None:
        assert raised is None, f"{op}: expected success, got {raised!r}"
    else:
        assert type(raised) is expected, f"{op}: expected {expected.__name__}, got {raised!r}"
        if isinstance(raised, StaleStateError | LeaseLostError):
            assert model.key in str(raised)
        after = snapshot(m, model.seg_id)
        assert after == before, f"{op} was refused but changed the manifest"
        return

    # --- success: update the model -------------------------------------------------------------
    if kind == "acquire":
        model.fence += 1
        model.owner, model.expires = op[1], now + timedelta(seconds=TTL)
        assert result.fence == model.fence and result.owner == op[1]
        model.leases.append(result)
    elif kind == "release":
        ours = lease.fence == model.fence and lease.owner == model.owner
        assert result is ours, f"{op}: release returned {result}, expected {ours}"
        if ours:
            model.owner = model.expires = None
        else:
            assert snapshot(m, model.seg_id) == before
    elif kind == "renew":
        model.expires = now + timedelta(seconds=TTL)
        assert result.expires == model.expires and result.fence == lease.fence
    elif kind in ("add", "seal"):
        added = parts if kind == "add" else final
        records = result[-len(added) :] if added else []
        assert [(c.part_number, c.start, c.end) for c in records] == [
            (p.part_number, p.start, p.end) for p in added
        ]
        for c, p in zip(records, added, strict=True):
            assert c.state is CommitState.PENDING and c.md5 == p.md5
            model.commits.append([c.id, "pending", p.md5])
            new_events.append((c.id, None, "pending", lease.owner, lease.fence))
        model.end += PART * len(added)
        if kind == "seal":
            model.state, model.size = "sealed", model.end
            new_events.append((None, "open", "sealed", lease.owner, lease.fence))
    elif kind == "segment":
        model.state = dst
        new_events.append((None, src, dst, lease.owner, lease.fence))
        if dst == "verified":
            for c in model.commits:
                c[1] = "verified"
                new_events.append((c[0], "uploaded", "verified", lease.owner, lease.fence))
    elif kind == "commit":
        assert target is not None
        target[1] = dst
        new_events.append((commit_id, src, dst, lease.owner, lease.fence))
    elif kind == "uploaded_etag":
        if record.state is CommitState.PENDING:
            model.commits[ix % len(model.commits)][1] = "uploaded"
            new_events.append((record.id, "pending", "uploaded", lease.owner, lease.fence))
        else:
            assert snapshot(m, model.seg_id) == before  # the same ETag again: nothing moved
    elif kind == "verify":
        model.state = "verified"
        new_events.append((None, "uploaded", "verified", lease.owner, lease.fence))
        for c in model.commits:
            c[1] = "verified"
            new_events.append((c[0], "uploaded", "verified", lease.owner, lease.fence))
        sort_tail = True
    elif kind == "reupload":
        model.state = "sealed"
        new_events.append((None, "uploaded", "sealed", lease.owner, lease.fence))
        for c in model.commits:
            if c[1] == "uploaded":
                c[1] = "pending"
                new_events.append((c[0], "uploaded", "pending", lease.owner, lease.fence))
        sort_tail = True
    elif kind == "fail":
        new_events.append((None, model.state, "failed", lease.owner, lease.fence))
        model.state = "failed"
        for c in model.commits:
            if c[1] in ("pending", "uploaded", "verified"):
                new_events.append((c[0], c[1], "failed", lease.owner, lease.fence))
                c[1] = "failed"
        sort_tail = True

    # --- the database agrees with the model ----------------------------------------------------
    seg = m.segment_by_id(model.seg_id)
    assert (seg.state.value, seg.fence, seg.lease_owner, seg.lease_expires, seg.size) == (
        model.state,
        model.fence,
        model.owner,
        model.expires,
        model.size,
    ), op
    commits = m.commits(model.seg_id)
    assert [(c.id, c.state.value) for c in commits] == [(c[0], c[1]) for c in model.commits], op
    for c in commits:  # an acknowledged part has its ETag; a part to (re-)send has none
        if c.state in (CommitState.UPLOADED, CommitState.VERIFIED):
            assert c.etag is not None, op
        if c.state is CommitState.PENDING:
            assert c.etag is None, op
    got = event_keys(m, model.seg_id)[n_events:]
    if sort_tail:
        assert got[:1] == new_events[:1], op
        assert sorted(got[1:], key=repr) == sorted(new_events[1:], key=repr), op
        new_events = got  # the order within one statement is the database's
    else:
        assert got == new_events, op
    model.events.extend(new_events)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=sequences)
# Found by this test: the same acknowledgement written again a second later (an answer lost, tried
# again) moved the segment row's updated_at though nothing else changed.
@example(
    ops=[
        ("seal", 0, True),
        ("uploaded_etag", 0, -1, True),
        ("advance", 1),
        ("uploaded_etag", 0, -1, True),
    ]
)
def test_random_transition_attempts_match_the_model(
    manifest: Manifest, ops: list[tuple[Any, ...]]
) -> None:
    clock = Clock()
    m = Manifest(manifest.engine, clock=clock)  # same database, our clock
    key = f"hyp/{uuid.uuid4().hex}"
    seg = m.register(key, f"/data/{key}", node="n1", part_size=PART, worker="registrar")
    model = Model(seg_id=seg.id, key=key)
    model.events.append((None, None, "open", "registrar", 0))
    # Most interesting sequences start with a lease: give every example one.
    for op in [("acquire", "alice"), *ops]:
        play(m, model, clock, op)
    event(f"final segment state: {model.state}")
    assert event_keys(m, model.seg_id) == model.events


def test_model_covers_a_full_lifecycle_with_a_takeover(manifest: Manifest) -> None:
    """A fixed sequence through every state, so the model itself is known to reach them."""
    clock = Clock()
    m = Manifest(manifest.engine, clock=clock)
    key = "fixed/0001"
    seg = m.register(key, "/data/fixed", node="n1", part_size=PART, worker="registrar")
    model = Model(seg_id=seg.id, key=key)
    model.events.append((None, None, "open", "registrar", 0))
    ops: list[tuple[Any, ...]] = [
        ("acquire", "alice"),
        ("add", 0, 2),
        ("acquire", "bob"),  # busy
        ("advance", 11),  # alice's lease expired
        ("add", 0, 1),  # refused: expired
        ("acquire", "bob"),  # takeover
        ("add", 1, 1),  # alice (stale fence): refused
        ("renew", 1),  # alice: refused
        ("commit", 0, 0, ("pending", "uploaded"), True),
        ("uploaded_etag", 0, 1, True),
        ("seal", -1, True),  # forged: refused
        ("seal", 0, True),
        ("add", 0, 1),  # sealed: refused
        ("commit", 0, 2, ("pending", "uploaded"), True),
        ("segment", 0, ("sealed", "uploaded"), False),
        ("reupload", 0),
        ("commit", 0, 0, ("pending", "uploaded"), True),
        ("commit", 0, 1, ("pending", "uploaded"), True),
        ("commit", 0, 2, ("pending", "uploaded"), True),
        ("segment", 0, ("sealed", "uploaded"), False),
        ("verify", 1),  # alice: refused
        ("verify", 0),
        ("release", 0),
        ("release", 0),  # already released
    ]
    for op in ops:
        play(m, model, clock, op)
    assert model.state == "verified"
    assert {c[1] for c in model.commits} == {"verified"}
    assert event_keys(m, seg.id) == model.events
    workers = {e[3] for e in model.events}
    assert workers == {"registrar", "alice", "bob"}
