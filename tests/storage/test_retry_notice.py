"""A retried call is never silent: ``on_retry`` names the endpoint, the operation, the attempt
and the wait (the CLI prints it on stderr)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_MIN_PART_SIZE, s3_options
from tests.storage.test_safety import _Blackhole
from uploader.errors import RetryableStorageError, StorageTimeoutError
from uploader.storage import (
    Fault,
    FaultyStorage,
    RetryingStorage,
    RetryNotice,
    RetryPolicy,
    open_storage,
)


def test_each_retry_is_announced_before_its_wait(tmp_path: Path) -> None:
    inner = open_storage(f"file://{tmp_path}", {}, retry=None)
    faulty = FaultyStorage(inner, [Fault(op="head", times=2)])
    notices: list[tuple[RetryNotice, float]] = []
    retrying = RetryingStorage(
        faulty,
        RetryPolicy(attempts=4, base=0.001, cap=0.002),
        on_retry=lambda n: notices.append((n, time.monotonic())),
    )
    assert retrying.head("nothing/here") is None  # the third attempt answers
    assert [(n.op, n.attempt, n.attempts) for n, _ in notices] == [("head", 1, 4), ("head", 2, 4)]
    assert all(n.where == f"file://{tmp_path}" and 0 <= n.wait <= 0.002 for n, _ in notices)
    assert "injected" in str(notices[0][0].error)
    assert str(notices[0][0]).startswith(f"retrying head on file://{tmp_path} in 0.0 s (attempt 1")

    # A hook that raises changes nothing about the call.
    def broken(_: RetryNotice) -> None:
        raise RuntimeError("hook bug")

    faulty.add(Fault(op="head", times=1))
    retrying.on_retry = broken
    assert retrying.head("nothing/here") is None


def test_an_endpoint_that_never_answers_is_named_at_each_retry() -> None:
    hole = _Blackhole()  # accepts connections, never answers
    notices: list[RetryNotice] = []
    try:
        st = open_storage(
            "s3://bucket/root",
            s3_options(f"http://127.0.0.1:{hole.port}"),
            min_part_size=TEST_MIN_PART_SIZE,
            retry=RetryPolicy(attempts=3, base=0.001, cap=0.001, deadline=0.3),
        )
        assert isinstance(st, RetryingStorage)
        st.on_retry = notices.append
        with pytest.raises(StorageTimeoutError):
            st.head("k")
        st.close()
    finally:
        hole.close()
    assert [(n.op, n.attempt) for n in notices] == [("head", 1), ("head", 2)]
    for n in notices:
        assert n.where == f"http://127.0.0.1:{hole.port} (s3://bucket/root)"
        assert isinstance(n.error, StorageTimeoutError)
        assert f"127.0.0.1:{hole.port}" in str(n) and "attempt" in str(n)


def test_a_closed_port_is_retried_with_notices() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    notices: list[RetryNotice] = []
    st = open_storage(
        "s3://bucket/root",
        s3_options(f"http://127.0.0.1:{port}"),
        min_part_size=TEST_MIN_PART_SIZE,
        retry=RetryPolicy(attempts=3, base=0.001, cap=0.001, deadline=5.0),
    )
    assert isinstance(st, RetryingStorage)
    st.on_retry = notices.append
    with pytest.raises(RetryableStorageError):
        st.list_uploads()
    st.close()
    assert [(n.op, n.attempt, n.attempts) for n in notices] == [
        ("list_uploads", 1, 3),
        ("list_uploads", 2, 3),
    ]
    assert "connect" in str(notices[0].error).lower()
