"""Bounded retries with exponential backoff and full jitter, and a deadline per request.

Only errors with ``retryable=True`` are retried (throttling, 5xx, timeouts, resets); anything else
is raised at once. Each attempt runs on a worker thread and is abandoned after ``deadline``
seconds with :class:`StorageTimeoutError` (itself retryable): a hung request is cut and tried
again instead of hanging the upload forever. The abandoned thread finishes in the background;
since parts are idempotent by number and completes are conditional, a late duplicate is harmless.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from uploader.digest import Payload
from uploader.errors import StorageError, StorageTimeoutError
from uploader.storage.base import Expected, ObjectInfo, PartRef, Storage, UploadRef

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all; waits ``uniform(0, min(cap, base * 2**n))`` between them."""

    attempts: int = 5
    base: float = 0.1
    cap: float = 5.0
    deadline: float | None = 120.0  # seconds per request; None: no deadline

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0, min(self.cap, self.base * 2**attempt))


class RetryingStorage:
    """Wraps a :class:`Storage`: retries retryable failures, cuts hung requests."""

    def __init__(self, inner: Storage, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self._lock = threading.Lock()
        self.retries = 0  # how many calls were tried again (for metrics)
        self._pool: ThreadPoolExecutor | None = None
        if self.policy.deadline is not None:
            self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="uploader-request")

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def min_part_size(self) -> int:
        return self.inner.min_part_size

    def _once(self, op: str, fn: Callable[[], T]) -> T:
        if self._pool is None or self.policy.deadline is None:
            return fn()
        fut = self._pool.submit(fn)
        try:
            return fut.result(timeout=self.policy.deadline)
        except FutureTimeout:
            fut.cancel()
            raise StorageTimeoutError(
                f"{op} on {self.inner.url}: no answer within {self.policy.deadline:g} s; "
                "the request was abandoned"
            ) from None

    def _run(self, op: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return self._once(op, fn)
            except StorageError as exc:
                attempt += 1
                if not exc.retryable or attempt >= self.policy.attempts:
                    raise
                with self._lock:
                    self.retries += 1
                time.sleep(self.policy.backoff(attempt - 1))

    def start_upload(self, key: str) -> str:
        return self._run("start_upload", lambda: self.inner.start_upload(key))

    def upload_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartRef:
        return self._run(
            "upload_part", lambda: self.inner.upload_part(key, upload_id, number, payload)
        )

    def list_parts(self, key: str, upload_id: str) -> list[PartRef]:
        return self._run("list_parts", lambda: self.inner.list_parts(key, upload_id))

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[PartRef],
        expected: Expected | None = None,
    ) -> ObjectInfo:
        return self._run("complete", lambda: self.inner.complete(key, upload_id, parts, expected))

    def abort(self, key: str, upload_id: str) -> None:
        self._run("abort", lambda: self.inner.abort(key, upload_id))

    def put(self, key: str, payload: Payload) -> ObjectInfo:
        return self._run("put", lambda: self.inner.put(key, payload))

    def head(self, key: str) -> ObjectInfo | None:
        return self._run("head", lambda: self.inner.head(key))

    def read(self, key: str, start: int, end: int) -> bytes:
        return self._run("read", lambda: self.inner.read(key, start, end))

    def list_uploads(self, prefix: str = "") -> list[UploadRef]:
        return self._run("list_uploads", lambda: self.inner.list_uploads(prefix))

    def delete(self, key: str) -> None:
        self._run("delete", lambda: self.inner.delete(key))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Backend extras (e.g. S3Storage.bucket) stay reachable through the wrapper.
        return getattr(self.inner, name)
