"""``put_many``: who sends a batch of PUTs, and what the retry layer does with its failures.

The contract itself (each answer as :meth:`Storage.put` alone would give it, on every backend) is
in ``test_contract.py``; here: a wrapper that forwards unknown attributes is never gone around,
and :class:`RetryingStorage` sends a batch's retryable failures again together, a round per
attempt (the batch's counted as the first), and nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from tests.conftest import TEST_MIN_PART_SIZE, s3_options
from tests.storage.conftest import payload
from uploader.digest import Payload
from uploader.errors import AccessDeniedError, RetryableStorageError, StorageError
from uploader.storage import RetryingStorage, RetryNotice, RetryPolicy, Storage, open_storage
from uploader.storage.base import ObjectInfo, PutAnswer, PutItem, put_many

NO_WAIT = RetryPolicy(attempts=3, base=0.0, cap=0.0)


class Forwarding:
    """A test double as several tests write them: ``put`` observed, the rest forwarded."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.puts: list[str] = []

    def put(self, key: str, data: Payload, metadata: Mapping[str, str] | None = None) -> Any:
        self.puts.append(key)
        return self.inner.put(key, data, metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def s3(moto_endpoint: str, s3_bucket: str) -> Iterator[Storage]:
    st = open_storage(
        f"s3://{s3_bucket}/root",
        s3_options(moto_endpoint),
        min_part_size=TEST_MIN_PART_SIZE,
        retry=None,
    )
    try:
        yield st
    finally:
        st.close()


def test_a_forwarding_wrapper_is_not_gone_around(s3: Storage) -> None:
    """S3 sends a batch itself, but a wrapper that only forwards ``put_many`` by ``__getattr__``
    would let the batch skip the wrapper's ``put``: only a class's own ``put_many`` counts."""
    assert callable(getattr(type(s3), "put_many", None))
    wrapper = Forwarding(s3)
    answers = put_many(
        wrapper,
        [PutItem(f"fw/{i}", payload(bytes([i]) * 10)) for i in range(3)],
        concurrency=4,
    )
    assert wrapper.puts == ["fw/0", "fw/1", "fw/2"]
    assert all(a.info is not None for a in answers)


class Batching:
    """A backend that sends batches itself; each key fails as told, a given number of times."""

    url = "test://batching"
    min_part_size = TEST_MIN_PART_SIZE

    def __init__(self, failures: dict[str, list[Exception]]) -> None:
        self.failures = failures
        self.batches: list[list[str]] = []

    def put(self, key: str, data: Payload, metadata: Mapping[str, str] | None = None) -> Any:
        raise AssertionError("a batch is retried as a batch, never one put at a time")

    def put_many(
        self,
        items: Sequence[PutItem],
        *,
        concurrency: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[PutAnswer]:
        self.batches.append([it.key for it in items])
        out = []
        for it in items:
            pending = self.failures.get(it.key)
            if pending:
                out.append(PutAnswer(error=pending.pop(0)))
            else:
                info = ObjectInfo(key=it.key, size=it.payload.size, etag=it.payload.md5)
                out.append(PutAnswer(info=info))
        return out


def _slow(key: str) -> RetryableStorageError:
    return RetryableStorageError(f"put_object of {key!r}: 503 SlowDown")


def test_retrying_storage_sends_a_batchs_retryable_failures_again_together() -> None:
    inner = Batching(
        {
            "b/slow": [_slow("b/slow")],
            "b/slower": [_slow("b/slower"), _slow("b/slower")],
            "b/denied": [AccessDeniedError("put_object of 'b/denied': 403 AccessDenied")],
        }
    )
    notices: list[RetryNotice] = []
    retrying = RetryingStorage(inner, NO_WAIT, on_retry=notices.append)  # type: ignore[arg-type]
    keys = ["b/ok", "b/slow", "b/denied", "b/slower"]
    answers = retrying.put_many([PutItem(k, payload(b"abc")) for k in keys], concurrency=2)
    assert [a.info.key if a.info else None for a in answers] == ["b/ok", "b/slow", None, "b/slower"]
    # Not retryable: answered as the batch said, never sent again.
    assert isinstance(answers[2].error, AccessDeniedError)
    # One round per attempt, each with only what is still failing; one notice per round.
    assert inner.batches == [keys, ["b/slow", "b/slower"], ["b/slower"]]
    assert [(n.op, n.attempt) for n in notices] == [("put", 1), ("put", 2)]
    assert retrying.retries == 3


def test_retrying_storage_gives_up_after_its_attempts_or_when_told_to_stop() -> None:
    inner = Batching({"s/x": [_slow("s/x") for _ in range(5)]})
    retrying = RetryingStorage(inner, NO_WAIT)  # type: ignore[arg-type]
    [answer] = retrying.put_many([PutItem("s/x", payload(b"x"))], concurrency=1)
    assert isinstance(answer.error, RetryableStorageError)
    assert inner.batches == [["s/x"]] * 3  # the policy's 3 attempts, the batch's the first
    inner = Batching({"s/y": [_slow("s/y")]})
    retrying = RetryingStorage(inner, NO_WAIT)  # type: ignore[arg-type]
    [answer] = retrying.put_many(
        [PutItem("s/y", payload(b"y"))], concurrency=1, stop=lambda: bool(inner.batches)
    )
    assert isinstance(answer.error, RetryableStorageError)
    assert inner.batches == [["s/y"]]  # stopped: no second round


def test_a_request_cancelled_in_a_batch_is_its_own_unknown_answer(
    s3: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request of the batch that ends without an answer (cancelled) is that item's retryable
    "unknown" failure; the others are answered and written."""
    inner: Any = getattr(s3, "inner", s3)
    original = inner._acall

    async def acall(op: str, key: str | None, **kwargs: Any) -> Any:
        if key == "c/1":
            raise asyncio.CancelledError("the loop cancelled it")
        return await original(op, key, **kwargs)

    monkeypatch.setattr(inner, "_acall", acall)
    answers = put_many(
        s3, [PutItem(f"c/{i}", payload(bytes([i]) * 100)) for i in range(3)], concurrency=3
    )
    assert answers[0].info is not None and answers[2].info is not None
    error = answers[1].error
    assert isinstance(error, StorageError) and error.retryable
    assert "c/1" in str(error) and "unknown" in str(error)
    assert s3.head("c/1") is None and s3.head("c/2") is not None
