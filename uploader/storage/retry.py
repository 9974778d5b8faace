"""Bounded retries with exponential backoff and full jitter; a deadline per request.

Only errors with ``retryable=True`` are retried (throttling, 5xx, timeouts, resets); anything else
is raised at once.

No attempt is ever abandoned: each one runs on the caller's thread and has ended (its outcome
known) before the next is sent, so a request the retry layer gave up on is never still in flight
when it retries. The deadline (``RetryPolicy.deadline``) is enforced where a request can really be
cancelled, by the transport: :func:`uploader.storage.open_storage` hands it to
:class:`~uploader.storage.s3.S3Storage` as ``request_timeout``, which cancels the request on its
event loop and awaits the cancellation before raising :class:`StorageTimeoutError` (retryable).
A local filesystem call cannot be cancelled (a thread cannot be killed): it is waited for, never
left running behind a retry.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from uploader.digest import Payload
from uploader.errors import StorageError
from uploader.storage.base import (
    Expected,
    ObjectInfo,
    PartRef,
    PutAnswer,
    PutItem,
    Storage,
    UploadRef,
    put_many,
)

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all; waits ``uniform(0, min(cap, base * 2**n))`` between them."""

    attempts: int = 5
    base: float = 0.1
    cap: float = 5.0
    deadline: float | None = 120.0  # seconds per request, enforced by the transport; None: none

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0, min(self.cap, self.base * 2**attempt))


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """A remote call failed and is about to be tried again (passed to ``on_retry``)."""

    op: str  # the storage operation: upload_part, put, list_uploads, ...
    where: str  # the endpoint (S3: its URL, or the default AWS endpoint) and the remote root
    attempt: int  # the attempt that failed, from 1
    attempts: int  # attempts in all before giving up
    wait: float  # seconds before the next attempt
    error: StorageError

    def __str__(self) -> str:
        return (
            f"retrying {self.op} on {self.where} in {self.wait:.1f} s (attempt "
            f"{self.attempt} of {self.attempts} failed: {self.error})"
        )


def _where(inner: Storage) -> str:
    """The endpoint a call goes to, for people: an S3 endpoint URL and the remote root."""
    fs = getattr(inner, "fs", None)
    endpoint = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get(
        "endpoint_url"
    )
    if endpoint is None and inner.url.startswith(("s3://", "s3a://")):
        endpoint = "the default AWS endpoint"
    return inner.url if endpoint is None else f"{endpoint} ({inner.url})"


class RetryingStorage:
    """Wraps a :class:`Storage`: retries retryable failures, one attempt at a time.

    ``on_retry`` is called (on the calling thread, before the wait) each time a call is tried
    again, with a :class:`RetryNotice` naming the endpoint, the operation, the attempt and the
    wait: an unreachable endpoint is never silent (the CLI prints it on stderr). Without one,
    retries are logged at INFO on ``uploader.storage.retry``.
    """

    def __init__(
        self,
        inner: Storage,
        policy: RetryPolicy | None = None,
        *,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.on_retry = on_retry
        self._lock = threading.Lock()
        self.retries = 0  # how many calls were tried again (for metrics)
        self._where: str | None = None

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def min_part_size(self) -> int:
        return self.inner.min_part_size

    def check_key(self, key: str) -> None:
        self.inner.check_key(key)  # computed locally: nothing to retry or inject

    def _run(self, op: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()  # on this thread: the attempt has ended before any retry
            except StorageError as exc:
                attempt += 1
                if not exc.retryable or attempt >= self.policy.attempts:
                    raise
                with self._lock:
                    self.retries += 1
                wait = self.policy.backoff(attempt - 1)
                self._notify(op, attempt, wait, exc)
                time.sleep(wait)

    def _notify(self, op: str, attempt: int, wait: float, exc: StorageError) -> None:
        if self._where is None:
            self._where = _where(self.inner)
        notice = RetryNotice(op, self._where, attempt, self.policy.attempts, wait, exc)
        if self.on_retry is None:
            log.info("%s", notice)
            return
        try:
            self.on_retry(notice)
        except Exception:  # a reporting hook must never change what the call does
            log.exception("on_retry hook failed for %s", notice)

    def start_upload(self, key: str, metadata: Mapping[str, str] | None = None) -> str:
        return self._run("start_upload", lambda: self.inner.start_upload(key, metadata))

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

    def put(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        return self._run("put", lambda: self.inner.put(key, payload, metadata))

    def put_many(
        self,
        items: Sequence[PutItem],
        *,
        concurrency: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[PutAnswer]:
        """The batch as the storage it wraps sends it (see :func:`put_many`), then the PUTs that
        failed with a retryable error sent again together, one wait between rounds, each PUT
        given the policy's attempts in all (the batch's counted as the first). Every attempt
        of a round has ended before the next round; once ``stop`` says yes, no round starts."""
        answers = put_many(self.inner, items, concurrency=concurrency, stop=stop)
        for attempt in range(1, self.policy.attempts):
            failed = [
                i
                for i, a in enumerate(answers)
                if isinstance(a.error, StorageError) and a.error.retryable
            ]
            if not failed or (stop is not None and stop()):
                break
            with self._lock:
                self.retries += len(failed)
            wait = self.policy.backoff(attempt - 1)
            first = answers[failed[0]].error
            assert isinstance(first, StorageError)
            self._notify("put", attempt, wait, first)
            time.sleep(wait)
            again = put_many(
                self.inner, [items[i] for i in failed], concurrency=concurrency, stop=stop
            )
            for i, answer in zip(failed, again, strict=True):
                if answer.sent:  # one not sent (stopped) keeps its last failure
                    answers[i] = answer
        return answers

    def head_metadata(self, key: str) -> tuple[ObjectInfo, dict[str, str]] | None:
        return self._run("head_metadata", lambda: self.inner.head_metadata(key))

    def list_objects(self, prefix: str = "") -> list[str]:
        return self._run("list_objects", lambda: self.inner.list_objects(prefix))

    def write_hidden(self, name: str, data: bytes) -> None:
        self._run("write_hidden", lambda: self.inner.write_hidden(name, data))

    def read_hidden(self, name: str) -> bytes | None:
        return self._run("read_hidden", lambda: self.inner.read_hidden(name))

    def list_hidden(self, prefix: str) -> list[str]:
        return self._run("list_hidden", lambda: self.inner.list_hidden(prefix))

    def head(self, key: str) -> ObjectInfo | None:
        return self._run("head", lambda: self.inner.head(key))

    def read(self, key: str, start: int, end: int) -> bytes:
        return self._run("read", lambda: self.inner.read(key, start, end))

    def list_uploads(self, prefix: str = "") -> list[UploadRef]:
        return self._run("list_uploads", lambda: self.inner.list_uploads(prefix))

    def delete_if_match(self, key: str, etag: str) -> None:
        # Safe to retry: a first attempt that deleted (response lost) leaves the key empty, and
        # the retry then has nothing to do; another object is never touched.
        self._run("delete_if_match", lambda: self.inner.delete_if_match(key, etag))

    def conditional_delete(self) -> bool:
        return self._run("conditional_delete", self.inner.conditional_delete)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Backend extras (e.g. S3Storage.bucket) stay reachable through the wrapper.
        return getattr(self.inner, name)
