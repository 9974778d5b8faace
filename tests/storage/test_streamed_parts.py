"""The storage contract for parts whose bytes stay in the file (no whole part in memory).

Every backend, Ceph RGW included, takes a payload that holds no bytes: S3 streams it from the
file as it sends it, the staged backends read it whole, both checked against the checksums taken
in the digest pass. Bytes rewritten between that pass and the send are refused
(:class:`LocalFileError` naming the key, the file, the part and the range) and the remote does
not hold the part: moto checks neither Content-MD5 nor checksums, so our reader must.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import remote_bytes
from tests.conftest import REMOTES_WITH_RGW, TEST_MIN_PART_SIZE, make_remote
from uploader.digest import Payload, digest_range
from uploader.errors import LocalFileError
from uploader.storage import PartRef, Storage
from uploader.storage.faults import Fault, FaultyStorage
from uploader.storage.retry import RetryingStorage, RetryPolicy

PART = TEST_MIN_PART_SIZE


@pytest.fixture(params=REMOTES_WITH_RGW)
def remote(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    return make_remote(request, request.param, tmp_path)


def _file(tmp_path: Path, size: int, seed: int = 0) -> Path:
    path = tmp_path / "seg"
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    with path.open("r+b") as f:  # in place: the same file, other bytes
        f.write(data)


def _parts(path: Path) -> list[Payload]:
    size = path.stat().st_size
    return [digest_range(str(path), s, min(s + PART, size)) for s in range(0, size, PART)]


def test_parts_streamed_from_the_file_make_the_object(
    storage: Storage, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = _file(tmp_path, 2 * PART + 321)
    payloads = _parts(path)
    assert all(p.data is None for p in payloads)
    upload_id = storage.start_upload("stream/a")
    refs = [storage.upload_part("stream/a", upload_id, i, p) for i, p in enumerate(payloads, 1)]
    assert [r.etag for r in refs] == [p.md5 for p in payloads]
    parts = [
        PartRef(r.number, r.etag, r.size, p.crc32c) for r, p in zip(refs, payloads, strict=True)
    ]
    info = storage.complete("stream/a", upload_id, parts)
    assert info.size == path.stat().st_size
    assert remote_bytes(remote, "stream/a") == path.read_bytes()


def test_a_put_streamed_from_the_file(
    storage: Storage, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = _file(tmp_path, 5000, seed=3)
    info = storage.put("stream/put", digest_range(str(path), 0, 5000))
    assert info.size == 5000
    assert remote_bytes(remote, "stream/put") == path.read_bytes()


def test_a_part_rewritten_after_its_digest_is_refused_and_not_held(
    storage: Storage, tmp_path: Path
) -> None:
    path = _file(tmp_path, 2 * PART + 10, seed=1)
    first, second, _last = _parts(path)
    upload_id = storage.start_upload("stream/b")
    storage.upload_part("stream/b", upload_id, 1, first)
    _flip(path, PART + 100)  # between the digest pass and the send
    with pytest.raises(LocalFileError) as caught:
        storage.upload_part("stream/b", upload_id, 2, second)
    message = str(caught.value)
    for words in ("stream/b", str(path), "part 2", f"[{PART}, {2 * PART})", "changed"):
        assert words in message, message
    assert [p.number for p in storage.list_parts("stream/b", upload_id)] == [1]
    storage.abort("stream/b", upload_id)


def test_a_put_rewritten_after_its_digest_publishes_nothing(
    storage: Storage, tmp_path: Path
) -> None:
    path = _file(tmp_path, 3000, seed=2)
    payload = digest_range(str(path), 0, 3000)
    _flip(path, 2999)
    with pytest.raises(LocalFileError, match="stream/c"):
        storage.put("stream/c", payload)
    assert storage.head("stream/c") is None


def test_a_streamed_part_whose_response_was_lost_is_sent_again_identical(
    storage: Storage, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The remote received the part, the answer was lost, the retry layer sends it again from
    the file: the remote's ETag (the MD5 of what it received the second time) is the recorded
    one, and the object is the file."""
    path = _file(tmp_path, PART + 77, seed=4)
    payloads = _parts(path)
    faulty = FaultyStorage(storage, [Fault(op="upload_part", when="after", times=1)])
    retrying = RetryingStorage(faulty, RetryPolicy(attempts=3, base=0.0))
    upload_id = retrying.start_upload("stream/retry")
    refs = [
        retrying.upload_part("stream/retry", upload_id, i, p) for i, p in enumerate(payloads, 1)
    ]
    assert faulty.injected == [("upload_part", "after", "error")]
    assert retrying.retries == 1
    assert [r.etag for r in refs] == [p.md5 for p in payloads]
    parts = [
        PartRef(r.number, r.etag, r.size, p.crc32c) for r, p in zip(refs, payloads, strict=True)
    ]
    retrying.complete("stream/retry", upload_id, parts)
    assert remote_bytes(remote, "stream/retry") == path.read_bytes()
