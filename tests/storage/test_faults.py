"""The fault wrapper at every call site, and the retry layer's bounds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import TEST_MIN_PART_SIZE
from tests.storage.conftest import payload
from uploader.errors import AccessDeniedError, RetryableStorageError
from uploader.storage import Fault, FaultyStorage, RetryingStorage, RetryPolicy, Storage

PART = TEST_MIN_PART_SIZE


def _state(storage: Storage) -> tuple[Any, ...]:
    """What the remote holds: objects we care about and unfinished uploads."""
    uploads = sorted((u.key, u.upload_id) for u in storage.list_uploads())
    parts = tuple(
        (u[1], tuple((p.number, p.etag) for p in storage.list_parts(u[0], u[1]))) for u in uploads
    )
    heads = tuple(storage.head(k) for k in ("f/obj", "f/put", "f/del"))
    return tuple(uploads), parts, heads


def _calls(storage: Storage) -> dict[str, Callable[[], Any]]:
    """One call per operation, on a prepared remote."""
    upload_id = storage.start_upload("f/obj")
    ref = storage.upload_part("f/obj", upload_id, 1, payload(b"a" * 10))
    gone = storage.put("f/del", payload(b"to delete"))
    assert gone.etag is not None
    return {
        "start_upload": lambda: storage.start_upload("f/new"),
        "upload_part": lambda: storage.upload_part("f/obj", upload_id, 2, payload(b"b" * 10)),
        "list_parts": lambda: storage.list_parts("f/obj", upload_id),
        "complete": lambda: storage.complete("f/obj", upload_id, [ref]),
        "abort": lambda: storage.abort("f/obj", upload_id),
        "put": lambda: storage.put("f/put", payload(b"put")),
        "head": lambda: storage.head("f/obj"),
        "read": lambda: storage.read("f/del", 0, 3),
        "list_uploads": lambda: storage.list_uploads(),
        "delete_if_match": lambda: storage.delete_if_match("f/del", gone.etag or ""),
    }


MUTATING = {"start_upload", "upload_part", "complete", "abort", "put", "delete_if_match"}


@pytest.mark.parametrize("op", sorted(MUTATING | {"list_parts", "head", "read", "list_uploads"}))
def test_failure_before_and_after_every_call(storage: Storage, op: str) -> None:
    faulty = FaultyStorage(storage)
    calls = _calls(faulty)
    before = _state(storage)
    faulty.add(Fault(op=op, when="before", times=1))
    with pytest.raises(RetryableStorageError, match="injected"):
        calls[op]()
    assert _state(storage) == before, "a failure before the call must leave the remote unchanged"
    assert faulty.injected == [(op, "before", "error")]

    faulty.add(Fault(op=op, when="after", times=1))
    with pytest.raises(RetryableStorageError, match="injected"):
        calls[op]()
    after = _state(storage)
    if op in MUTATING:
        assert after != before, "a failure after the call: the remote applied it (lost response)"
    else:
        assert after == before
    assert faulty.injected[-1] == (op, "after", "error")


def test_schedule_and_seeded_faults() -> None:
    from uploader.storage.faults import OPS

    class Null:
        url = "null://"
        min_part_size = 1

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    f = FaultyStorage(Null(), [Fault(op="head", after_calls=2, times=2)])
    outcomes = []
    for _ in range(6):
        try:
            f.head("k")
            outcomes.append("ok")
        except RetryableStorageError:
            outcomes.append("fail")
    assert outcomes == ["ok", "ok", "fail", "fail", "ok", "ok"]

    def run(seed: int) -> list[str]:
        g = FaultyStorage(Null(), seed=seed, rate=0.5)
        out = []
        for _ in range(40):
            try:
                g.head("k")
                out.append("ok")
            except RetryableStorageError:
                out.append("fail")
        return out

    assert run(1) == run(1)
    assert "fail" in run(1) and "ok" in run(1)
    with pytest.raises(ValueError, match="unknown storage call"):
        Fault(op="nope")
    assert "head" in OPS


def test_retries_stop_at_the_bound_and_raise_a_retryable_error(storage: Storage) -> None:
    faulty = FaultyStorage(storage, [Fault(op="head")])
    retrying = RetryingStorage(faulty, RetryPolicy(attempts=4, base=0.001, cap=0.01))
    with pytest.raises(RetryableStorageError) as info:
        retrying.head("x")
    assert info.value.retryable
    assert len(faulty.injected) == 4
    assert retrying.retries == 3


def test_retry_recovers_from_transient_failures(storage: Storage) -> None:
    faulty = FaultyStorage(storage, [Fault(op="put", when="after", times=2)])
    retrying = RetryingStorage(faulty, RetryPolicy(attempts=5, base=0.001, cap=0.01))
    # The first attempt lands but its response is lost; the retries find the object already
    # there and accept it because it is the same (conditional put, idempotent).
    info = retrying.put("r/obj", payload(b"hello"))
    assert info.size == 5
    assert retrying.retries == 2


def test_non_retryable_errors_are_not_retried(storage: Storage) -> None:
    faulty = FaultyStorage(
        storage, [Fault(op="head", error=lambda: AccessDeniedError("injected: denied"))]
    )
    retrying = RetryingStorage(faulty, RetryPolicy(attempts=5, base=0.001))
    with pytest.raises(AccessDeniedError):
        retrying.head("x")
    assert len(faulty.injected) == 1
    assert retrying.retries == 0


def test_a_hung_attempt_is_waited_for_never_abandoned(storage: Storage) -> None:
    # A hang the transport cannot cancel (a local call): the retry layer waits for its outcome
    # instead of sending a second request beside it; the attempt then answers.
    faulty = FaultyStorage(storage, [Fault(op="head", kind="hang", seconds=0.3, times=1)])
    retrying = RetryingStorage(faulty, RetryPolicy(attempts=4, base=0.001, deadline=0.05))
    assert retrying.head("nothing/here") is None
    assert retrying.retries == 0
    assert faulty.injected == [("head", "before", "hang")]


def test_delay_fault_slows_the_call(storage: Storage) -> None:
    faulty = FaultyStorage(storage, [Fault(op="head", kind="delay", seconds=0.2, times=1)])
    started = time.monotonic()
    faulty.head("x")
    assert time.monotonic() - started >= 0.2
    done = threading.Event()
    faulty.add(Fault(op="head", kind="hang", times=1))

    def head_then_done() -> None:
        faulty.head("x")
        done.set()

    t = threading.Thread(target=head_then_done)
    t.start()
    assert not done.wait(0.2)
    faulty.release()
    assert done.wait(5)
