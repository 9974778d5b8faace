"""An object replaced at its key while it is read back: the bytes read may come from two objects
and prove neither. A read-back looks at the key again after its reads (``first_differing(seen=)``)
and concludes nothing when another object is there now (``ObjectChangedError``).

The replacement here keeps the size and differs only in the first part, which was read before
the swap: every part read still matches the record. Read without that second look, the object
of another writer passed as ours (a seal verified, a deep check found nothing).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from tests.api.test_no_blind_delete import _write_foreign
from tests.conftest import REMOTES_WITH_RGW
from uploader.errors import ObjectChangedError
from uploader.readback import first_differing
from uploader.remote_steps import CHANGED_PAUSES
from uploader.storage import open_storage
from uploader.storage.faults import FaultyStorage

KEY = "swap/0"
SIZE = 2 * PART + 77  # three parts


class SwapsDuringReadBack(FaultyStorage):
    """Another writer puts its object at the key read right after the first read, once."""

    def __init__(self, inner: Any, swap: Callable[[], None], *, every: bool = False) -> None:
        super().__init__(inner)
        self.swap = swap
        self.every = every  # after every read, not once
        self.armed = False
        self.swapped = False

    def read(self, key: str, start: int, end: int) -> bytes:
        data = super().read(key, start, end)
        if self.armed and (self.every or not self.swapped):
            self.swapped = True
            self.swap()
        return data


def other_writers_bytes(data: bytes) -> bytes:
    """Another writer's object of the same size: only its first part differs from ``data``."""
    return bytes(b ^ 0x5A for b in data[:PART]) + data[PART:]


def _setup(
    remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> tuple[Path, bytes, SwapsDuringReadBack]:
    data = random.Random(11).randbytes(SIZE)
    path = tmp_path / "seg"
    path.write_bytes(data)
    other = other_writers_bytes(data)
    url, options = remote
    storage = SwapsDuringReadBack(
        open_storage(url, dict(options), min_part_size=PART),
        lambda: _write_foreign(remote, KEY, other),
    )
    return path, data, storage


@pytest.fixture(params=REMOTES_WITH_RGW)
def remote(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    from tests.conftest import make_remote

    return make_remote(request, request.param, tmp_path)


def test_a_deep_check_of_an_object_replaced_mid_read_judges_the_new_one_and_repairs(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path, data, storage = _setup(remote, tmp_path)
    store = make_store(storage=storage)
    assert store.segment(KEY, path).seal().result(timeout=120).verified
    storage.armed = True
    pauses: list[float] = []
    store.driver.pause = pauses.append
    report = store.verify([KEY], deep=True)
    assert storage.swapped and pauses == [CHANGED_PAUSES[0]]  # one look again, after a pause
    [check] = report.checks
    # Judged again as the key is now: the other writer's object, whose first part differs.
    assert not check.ok and report.drifted == (KEY,), report
    assert "differ" in (check.problem or ""), check
    _repaired_where_the_remote_allows(store, remote, data)


def _repaired_where_the_remote_allows(
    store: uploader.Store, remote: tuple[str, dict[str, Any]], data: bytes
) -> None:
    """Another object replaced ours at a key we completed: it is removed by its ETag and ours
    uploaded again, where the remote honours conditional deletes; elsewhere it is left alone and
    the segment fails saying why (no blind delete)."""
    rec = store.manifest.segment(KEY)
    assert rec is not None
    if store.storage.conditional_delete():
        assert rec.state is uploader.SegmentState.VERIFIED, rec
        assert remote_bytes(remote, KEY) == data
    else:
        assert rec.state is uploader.SegmentState.FAILED, rec
        assert "does not honour conditional deletes" in (rec.reason or ""), rec.reason
        assert remote_bytes(remote, KEY) != data


def test_a_seal_read_back_across_a_replacement_is_not_verified(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path, data, storage = _setup(remote, tmp_path)
    storage.armed = True
    store = make_store(storage=storage, verify="deep")  # every seal read back
    error = store.segment(KEY, path).seal().exception(timeout=120)
    assert storage.swapped
    assert isinstance(error, uploader.UploaderError), error
    assert "changed while it was read back" in str(error), error
    rec = store.manifest.segment(KEY)
    assert rec is not None and rec.state is not uploader.SegmentState.VERIFIED, rec
    # Recovery looks at the key as it is now: another writer's bytes at a key we completed.
    store.recover()
    _repaired_where_the_remote_allows(store, remote, data)


@pytest.mark.parametrize("manifest_url", ["sqlite"], indirect=True)
def test_first_differing_without_a_second_look_would_vouch_for_the_mix(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The reads alone cannot tell: without ``seen`` they find every part as recorded."""
    path, _data, storage = _setup(remote, tmp_path)
    store = make_store(storage=storage)
    assert store.segment(KEY, path).seal().result(timeout=120).verified
    rec = store.manifest.segment(KEY)
    assert rec is not None
    parts = [(c.start, c.end, c.md5, c.crc32c) for c in store.manifest.commits(rec.id)]
    seen = storage.head(KEY)
    storage.armed = True
    assert first_differing(storage, KEY, parts) is None  # a mix of two objects, all "as recorded"
    storage.swapped, storage.armed = False, False
    with pytest.raises(ObjectChangedError, match="changed while it was read back"):
        first_differing(storage, KEY, parts, seen)


def test_a_key_rewritten_during_every_read_back_is_not_judged_and_stops_nothing(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Another writer keeps rewriting the key: each read-back spans two objects. The check gives
    up after a few looks without calling it drift (the segment stays verified), the checks
    after it still run, and the deletion gate does not offer the file."""
    path, data, _storage = _setup(remote, tmp_path)
    other = other_writers_bytes(data)
    flip = [data, other]
    url, options = remote

    def rewrite() -> None:
        flip.reverse()
        _write_foreign(remote, KEY, flip[0])

    storage = SwapsDuringReadBack(
        open_storage(url, dict(options), min_part_size=PART), rewrite, every=True
    )
    store = make_store(storage=storage)
    assert store.segment(KEY, path).seal().result(timeout=120).verified
    calm = tmp_path / "calm"
    calm.write_bytes(b"c" * 100)
    assert store.segment("calm/0", calm).seal().result(timeout=120).verified
    _write_foreign(remote, KEY, data)  # our bytes under another writer's ETag: a read tells
    rec = store.manifest.segment(KEY)
    info = storage.head(KEY)
    assert rec is not None and info is not None
    storage.armed = True
    pauses: list[float] = []
    store.driver.pause = pauses.append
    if info.etag != rec.expected_etag:
        assert KEY not in {r.key for r in store.deletable()}
        assert pauses == list(CHANGED_PAUSES)  # the gate looked again too, after each pause
        pauses.clear()
    # (The memory backend ties identical bytes to our ETag: its gate has nothing to read.)
    report = store.verify([KEY, "calm/0"], deep=True)
    # Looked at again after each pause, longer each time; the calm key at once.
    assert pauses == list(CHANGED_PAUSES) and pauses == sorted(pauses) and pauses[0] > 0
    flapping, calm_check = report.checks
    assert not flapping.ok and not flapping.drift, flapping
    assert "not judged" in (flapping.problem or "") and "changed" in (flapping.problem or "")
    assert calm_check.ok, calm_check  # the next check ran
    assert report.drifted == ()
    rec = store.manifest.segment(KEY)
    assert rec is not None and rec.state is uploader.SegmentState.VERIFIED
