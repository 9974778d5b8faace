"""Fault injection for our tests and for users' tests: wrap any :class:`Storage`.

A :class:`Fault` names a call (``op``, or ``"*"`` for every call), *when* it strikes and what it
does:

* ``when="before"``: the call fails without reaching the remote (nothing changed there);
* ``when="after"``: the remote applies the call, then the response is "lost" (an error is raised
  although the part arrived, the object was completed, ...): the hardest case for a client;
* ``kind="delay"``: the call is slowed by ``seconds``; ``kind="hang"``: it blocks until
  :meth:`FaultyStorage.release` or ``seconds`` pass (then proceeds);
* ``kind="late"``: a request held in the network past the caller's deadline. The caller gets
  :class:`StorageTimeoutError` at once, while the call itself is applied to ``inner`` later, on a
  background thread, when :meth:`FaultyStorage.release` is called (or after ``seconds``, if > 0).
  :meth:`FaultyStorage.wait_applied` waits until every late call so far was applied; ``late``
  lists them with their outcomes. Tests wait on that, never sleep.

Selectors: ``after_calls`` lets that many matching calls through first, ``times`` bounds how often
the fault fires (None: every time after that). ``FaultyStorage(inner, seed=..., rate=...)`` also
fails a random fraction of calls (before or after, by the seed) for randomized tests.
Every fault that fired is appended to ``injected`` as ``(op, when, kind)``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from uploader.digest import Payload
from uploader.errors import RetryableStorageError, StorageTimeoutError
from uploader.storage.base import (
    Expected,
    ObjectInfo,
    PartRef,
    Storage,
    UploadRef,
    keeps_crc32c,
)

OPS = (
    "start_upload",
    "upload_part",
    "list_parts",
    "complete",
    "abort",
    "put",
    "head",
    "read",
    "list_uploads",
    "delete_if_match",
)


def _default_error() -> BaseException:
    return RetryableStorageError("injected fault")


@dataclass
class Fault:
    op: str = "*"
    when: Literal["before", "after"] = "before"
    kind: Literal["error", "delay", "hang", "late"] = "error"
    error: Callable[[], BaseException] = _default_error
    after_calls: int = 0
    times: int | None = None
    seconds: float = 0.0
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.op != "*" and self.op not in OPS:
            raise ValueError(f"unknown storage call {self.op!r}; one of {', '.join(OPS)}")
        if self.when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', not {self.when!r}")
        if self.kind == "late" and self.when != "before":
            raise ValueError("a late call is held before it reaches the remote: when='before'")

    def strikes(self, op: str, when: str) -> bool:
        """Count a matching call and say whether the fault fires on it."""
        if when != self.when or (self.op != "*" and self.op != op):
            return False
        self.seen += 1
        if self.seen <= self.after_calls:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


@dataclass
class LateCall:
    """A call the caller saw time out, applied to the remote later."""

    op: str
    applied: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class FaultyStorage:
    """A :class:`Storage` that injects the faults it is given into calls to ``inner``."""

    def __init__(
        self,
        inner: Storage,
        faults: Sequence[Fault] = (),
        *,
        seed: int | None = None,
        rate: float = 0.0,
        error: Callable[[], BaseException] = _default_error,
    ) -> None:
        self.inner = inner
        self.faults: list[Fault] = list(faults)
        self.rate = rate
        self.rng = random.Random(seed)
        self.random_error = error
        self.injected: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.late: list[LateCall] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
        self.rate = 0.0

    def release(self) -> None:
        """Let every hung call proceed, and every late call be applied."""
        self._released.set()

    def wait_applied(self, timeout: float | None = None) -> bool:
        """Wait until every late call so far reached the remote; False if ``timeout`` passed."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            pending = list(self.late)
        for call in pending:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not call.applied.wait(left):
                return False
        return True

    def _hold(self, op: str, fault: Fault, fn: Callable[[], Any]) -> LateCall:
        call = LateCall(op)

        def apply() -> None:
            self._released.wait(fault.seconds if fault.seconds > 0 else None)
            try:
                call.result = fn()
            except BaseException as exc:  # recorded for the test to look at
                call.error = exc
            finally:
                call.applied.set()

        with self._lock:
            self.late.append(call)
        threading.Thread(target=apply, name=f"uploader-late-{op}", daemon=True).start()
        return call

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def min_part_size(self) -> int:
        return self.inner.min_part_size

    def check_key(self, key: str) -> None:
        self.inner.check_key(key)  # computed locally: nothing to retry or inject

    def _strike(self, op: str, when: str, fn: Callable[[], Any] | None = None) -> None:
        with self._lock:
            hits = [f for f in self.faults if f.strikes(op, when)]
            random_hit = self.rate > 0 and self.rng.random() < self.rate / 2
        for f in hits:
            if f.kind == "late":
                assert fn is not None
                self.injected.append((op, when, f.kind))
                self._hold(op, f, fn)
                raise StorageTimeoutError(
                    f"{op} on {self.url}: injected late call; no answer within the deadline "
                    "(the request is still in the network and will be applied later)"
                )
        for f in hits:
            self.injected.append((op, when, f.kind))
            if f.kind == "delay":
                time.sleep(f.seconds)
            elif f.kind == "hang":
                self._released.wait(f.seconds if f.seconds > 0 else None)
            elif f.kind == "late":
                continue
            else:
                raise f.error()
        if random_hit:
            self.injected.append((op, when, "error"))
            raise self.random_error()

    def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        self._strike(op, "before", fn)
        result = fn()
        self._strike(op, "after")
        return result

    def start_upload(self, key: str, metadata: Mapping[str, str] | None = None) -> str:
        out: str = self._call("start_upload", lambda: self.inner.start_upload(key, metadata))
        return out

    def upload_part(self, key: str, upload_id: str, number: int, payload: Payload) -> PartRef:
        out: PartRef = self._call(
            "upload_part", lambda: self.inner.upload_part(key, upload_id, number, payload)
        )
        return out

    def list_parts(self, key: str, upload_id: str) -> list[PartRef]:
        out: list[PartRef] = self._call("list_parts", lambda: self.inner.list_parts(key, upload_id))
        return out

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[PartRef],
        expected: Expected | None = None,
    ) -> ObjectInfo:
        out: ObjectInfo = self._call(
            "complete", lambda: self.inner.complete(key, upload_id, parts, expected)
        )
        return out

    def abort(self, key: str, upload_id: str) -> None:
        self._call("abort", lambda: self.inner.abort(key, upload_id))

    def put(
        self, key: str, payload: Payload, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        out: ObjectInfo = self._call("put", lambda: self.inner.put(key, payload, metadata))
        return out

    def head_metadata(self, key: str) -> tuple[ObjectInfo, dict[str, str]] | None:
        out: tuple[ObjectInfo, dict[str, str]] | None = self._call(
            "head_metadata", lambda: self.inner.head_metadata(key)
        )
        return out

    def list_objects(self, prefix: str = "") -> list[str]:
        out: list[str] = self._call("list_objects", lambda: self.inner.list_objects(prefix))
        return out

    def write_hidden(self, name: str, data: bytes) -> None:
        self._call("write_hidden", lambda: self.inner.write_hidden(name, data))

    def read_hidden(self, name: str) -> bytes | None:
        out: bytes | None = self._call("read_hidden", lambda: self.inner.read_hidden(name))
        return out

    def list_hidden(self, prefix: str) -> list[str]:
        out: list[str] = self._call("list_hidden", lambda: self.inner.list_hidden(prefix))
        return out

    def head(self, key: str) -> ObjectInfo | None:
        out: ObjectInfo | None = self._call("head", lambda: self.inner.head(key))
        return out

    def read(self, key: str, start: int, end: int) -> bytes:
        out: bytes = self._call("read", lambda: self.inner.read(key, start, end))
        return out

    def list_uploads(self, prefix: str = "") -> list[UploadRef]:
        out: list[UploadRef] = self._call("list_uploads", lambda: self.inner.list_uploads(prefix))
        return out

    def delete_if_match(self, key: str, etag: str) -> None:
        self._call("delete_if_match", lambda: self.inner.delete_if_match(key, etag))

    def conditional_delete(self) -> bool:
        """Not a fault site: the capability of the wrapped remote."""
        return self.inner.conditional_delete()

    def keeps_crc32c(self) -> bool:
        """Not a fault site: the capability of the wrapped remote (False where it has none)."""
        return keeps_crc32c(self.inner)

    def close(self) -> None:
        self.release()
        self.inner.close()

    @property
    def retries(self) -> int:
        return int(getattr(self.inner, "retries", 0))
