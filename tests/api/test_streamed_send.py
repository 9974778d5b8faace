"""A part is streamed from the file when it is sent, and checked against its digest pass.

Bytes rewritten between the pass that took a part's checksums (recorded ``pending`` with them)
and its send must not become an ``uploaded`` part: moto checks neither Content-MD5 nor checksums,
so the reader that streams the part (S3) or reads it whole (staged backends) must refuse them.
The change is made from inside ``Transport.send_part``, right before the part's bytes are read
for sending, on every manifest and every remote.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from uploader.errors import LocalFileError, SegmentFailedError
from uploader.transport import Transport


@pytest.fixture
def flip_before_send(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Flip one byte of part ``number`` of the file right before that part is sent."""
    target: dict[str, Any] = {"number": 2, "flipped": 0}
    send = Transport.send_part

    def flipping(self: Transport, seg: Any, upload_id: str, commit: Any, payload: Any) -> Any:
        if commit.part_number == target["number"] and not target["flipped"]:
            with open(seg.path, "r+b") as f:
                f.seek(commit.start + 17)
                old = f.read(1)
                f.seek(commit.start + 17)
                f.write(bytes([old[0] ^ 0xFF]))
            target["flipped"] += 1
        return send(self, seg, upload_id, commit, payload)

    monkeypatch.setattr(Transport, "send_part", flipping)
    yield target


def _part(store: uploader.Store, key: str, number: int) -> Any:
    rec = store.manifest.segment(key)
    assert rec is not None
    [commit] = [c for c in store.manifest.commits(rec.id) if c.part_number == number]
    return commit


def _not_uploaded(commit: Any) -> None:
    assert commit.etag is None, commit
    assert commit.state in (uploader.CommitState.PENDING, uploader.CommitState.FAILED), commit


def test_a_final_part_changed_before_its_send_fails_the_seal(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    flip_before_send: dict[str, Any],
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(random.Random(4).randbytes(3 * PART + 10))
    store = make_store()
    key = "stream/seal"
    with pytest.raises(SegmentFailedError) as caught:
        store.segment(key, path).seal().result(timeout=60)
    assert flip_before_send["flipped"] == 1
    message = str(caught.value)
    for words in ("changed after they were committed", "part 2", f"[{PART}, {2 * PART})"):
        assert words in message, message
    rec = store.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.FAILED
    _not_uploaded(_part(store, key, 2))
    assert remote_bytes(remote, key) is None


def test_a_part_changed_before_its_send_is_not_committed(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    flip_before_send: dict[str, Any],
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(random.Random(6).randbytes(2 * PART + 5))
    store = make_store()
    key = "stream/commit"
    seg = store.segment(key, path)
    with pytest.raises(LocalFileError, match="part 2"):
        seg.commit().result(timeout=60)
    assert flip_before_send["flipped"] == 1
    assert _part(store, key, 1).state is uploader.CommitState.UPLOADED
    _not_uploaded(_part(store, key, 2))
    # The bytes the part was recorded with are gone: the segment can never be verified.
    with pytest.raises(SegmentFailedError, match="changed after they were committed"):
        seg.seal().result(timeout=60)
    assert remote_bytes(remote, key) is None
