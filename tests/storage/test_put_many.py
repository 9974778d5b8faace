"""``put_many``: who sends a batch of PUTs, and what the retry layer does with its failures.

The contract itself (each answer as :meth:`Storage.put` alone would give it, on every backend) is
in ``test_contract.py``; here: a wrapper that forwards unknown attributes is never gone around,
and :class:`RetryingStorage` retries a batch's retryable failures one at a time, its first
attempt counted, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from tests.conftest import TEST_MIN_PART_SIZE, s3_options
from tests.storage.conftest import payload
from uploader.digest import Payload
from uploader.errors import AccessDeniedError, RetryableStorageError
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
    """A backend that sends batches itself: its batch fails as told; ``put`` alone succeeds."""

    url = "test://batching"
    min_part_size = TEST_MIN_PART_SIZE

    def __init__(self, batch_errors: dict[str, Exception]) -> None:
        self.batch_errors = batch_errors
        self.puts: list[str] = []

    def put(self, key: str, data: Payload, metadata: Mapping[str, str] | None = None) -> Any:
        self.puts.append(key)
        return ObjectInfo(key=key, size=data.size, etag=data.md5)

    def put_many(
        self,
        items: Sequence[PutItem],
        *,
        concurrency: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[PutAnswer]:
        return [
            PutAnswer(error=self.batch_errors[it.key])
            if it.key in self.batch_errors
            else PutAnswer(info=ObjectInfo(key=it.key, size=it.payload.size, etag=it.payload.md5))
            for it in items
        ]


def test_retrying_storage_retries_a_batchs_retryable_failures_alone() -> None:
    inner = Batching(
        {
            "b/slow": RetryableStorageError("put_object of 'b/slow': 503 SlowDown"),
            "b/denied": AccessDeniedError("put_object of 'b/denied': 403 AccessDenied"),
        }
    )
    notices: list[RetryNotice] = []
    retrying = RetryingStorage(inner, NO_WAIT, on_retry=notices.append)  # type: ignore[arg-type]
    items = [PutItem(k, payload(b"abc")) for k in ("b/ok", "b/slow", "b/denied")]
    answers = retrying.put_many(items, concurrency=2)
    assert answers[0].info is not None and answers[0].info.key == "b/ok"
    # Retried once, alone, through put: the batch's attempt counted as the first.
    assert answers[1].info is not None and answers[1].info.key == "b/slow"
    assert inner.puts == ["b/slow"]
    assert [(n.op, n.attempt) for n in notices] == [("put", 1)]
    assert retrying.retries == 1
    # Not retryable: answered as the batch said, never sent again.
    assert isinstance(answers[2].error, AccessDeniedError)


def test_retrying_storage_gives_up_after_its_attempts() -> None:
    class AlwaysSlow(Batching):
        def put(self, key: str, data: Payload, metadata: Mapping[str, str] | None = None) -> Any:
            self.puts.append(key)
            raise RetryableStorageError(f"put_object of {key!r}: 503 SlowDown")

    inner = AlwaysSlow({"s/x": RetryableStorageError("put_object of 's/x': 503 SlowDown")})
    retrying = RetryingStorage(inner, NO_WAIT)  # type: ignore[arg-type]
    [answer] = retrying.put_many([PutItem("s/x", payload(b"x"))], concurrency=1)
    assert isinstance(answer.error, RetryableStorageError)
    assert inner.puts == ["s/x", "s/x"]  # attempts 2 and 3; the batch's was the first
