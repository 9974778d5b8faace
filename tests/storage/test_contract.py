"""The storage contract, run unchanged against S3 (moto over HTTP, and Ceph RGW), file:// and
memory://."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.api.conftest import remote_bytes, visible_keys
from tests.conftest import REMOTES_WITH_RGW, TEST_MIN_PART_SIZE, make_remote, md5
from tests.storage.conftest import payload
from uploader.digest import multipart_etag
from uploader.errors import NoSuchUploadError, ObjectExistsError, PartRuleError
from uploader.storage import Expected, PartRef, Storage
from uploader.storage.base import PutItem, put_many

PART = TEST_MIN_PART_SIZE


@pytest.fixture(params=REMOTES_WITH_RGW)
def remote(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """Every backend, Ceph RGW included: a real S3 implementation that answers differently."""
    return make_remote(request, request.param, tmp_path)


def _parts(n: int, last: int = 100, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(PART) for _ in range(n - 1)] + [rng.randbytes(last)]


def _upload(storage: Storage, key: str, blobs: list[bytes]) -> tuple[str, list[PartRef]]:
    upload_id = storage.start_upload(key)
    refs = []
    for i, blob in enumerate(blobs, start=1):
        refs.append(storage.upload_part(key, upload_id, i, payload(blob)))
    return upload_id, refs


def test_nothing_is_visible_before_complete(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    blobs = _parts(3)
    upload_id, refs = _upload(storage, "seg/a", blobs)
    assert storage.head("seg/a") is None
    assert remote_bytes(remote, "seg/a") is None
    assert visible_keys(remote) == []
    info = storage.complete("seg/a", upload_id, refs)
    assert info.size == sum(map(len, blobs))
    assert remote_bytes(remote, "seg/a") == b"".join(blobs)
    assert visible_keys(remote) == ["seg/a"]
    assert storage.list_uploads() == []


def test_completed_etag_is_the_multipart_etag_of_the_part_md5s(storage: Storage) -> None:
    blobs = _parts(3, seed=1)
    upload_id, refs = _upload(storage, "seg/etag", blobs)
    assert [r.etag for r in refs] == [payload(b).md5 for b in blobs]
    info = storage.complete("seg/etag", upload_id, refs)
    expected = multipart_etag([md5(payload(b)) for b in blobs])
    assert info.etag == expected
    head = storage.head("seg/etag")
    assert head is not None and head.etag == expected and head.size == info.size


def test_resume_from_listed_parts(storage: Storage, remote: tuple[str, dict[str, Any]]) -> None:
    blobs = _parts(4, seed=2)
    upload_id = storage.start_upload("seg/resume")
    storage.upload_part("seg/resume", upload_id, 1, payload(blobs[0]))
    storage.upload_part("seg/resume", upload_id, 3, payload(blobs[2]))
    listed = storage.list_parts("seg/resume", upload_id)
    assert [(p.number, p.etag, p.size) for p in listed] == [
        (1, payload(blobs[0]).md5, PART),
        (3, payload(blobs[2]).md5, PART),
    ]
    have = {p.number for p in listed}
    for i, blob in enumerate(blobs, start=1):
        if i not in have:
            storage.upload_part("seg/resume", upload_id, i, payload(blob))
    refs = storage.list_parts("seg/resume", upload_id)
    assert [p.number for p in refs] == [1, 2, 3, 4]
    storage.complete("seg/resume", upload_id, refs)
    assert remote_bytes(remote, "seg/resume") == b"".join(blobs)


def test_same_part_number_twice_is_idempotent(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    first, second = _parts(2, last=PART, seed=3)
    upload_id = storage.start_upload("seg/twice")
    storage.upload_part("seg/twice", upload_id, 1, payload(first))
    storage.upload_part("seg/twice", upload_id, 1, payload(first))  # a re-sent PUT
    storage.upload_part("seg/twice", upload_id, 2, payload(first))
    storage.upload_part("seg/twice", upload_id, 2, payload(second))  # the newest wins
    refs = storage.list_parts("seg/twice", upload_id)
    assert [(p.number, p.etag) for p in refs] == [(1, payload(first).md5), (2, payload(second).md5)]
    storage.complete("seg/twice", upload_id, refs)
    assert remote_bytes(remote, "seg/twice") == first + second


def test_abort_leaves_nothing(storage: Storage, remote: tuple[str, dict[str, Any]]) -> None:
    upload_id, _refs = _upload(storage, "seg/abort", _parts(2))
    assert [u.upload_id for u in storage.list_uploads()] == [upload_id]
    storage.abort("seg/abort", upload_id)
    assert storage.list_uploads() == []
    assert storage.head("seg/abort") is None
    assert visible_keys(remote) == []
    with pytest.raises(NoSuchUploadError):
        storage.list_parts("seg/abort", upload_id)
    storage.abort("seg/abort", upload_id)  # aborting again is not an error


def test_list_uploads_under_a_prefix(storage: Storage) -> None:
    a = storage.start_upload("logs/a/1")
    b = storage.start_upload("logs/b/1")
    c = storage.start_upload("other/1")
    assert {u.upload_id for u in storage.list_uploads()} == {a, b, c}
    assert [(u.key, u.upload_id) for u in storage.list_uploads("logs/a/")] == [("logs/a/1", a)]
    assert {u.key for u in storage.list_uploads("logs/")} == {"logs/a/1", "logs/b/1"}
    for u in storage.list_uploads():
        assert u.initiated is not None
        storage.abort(u.key, u.upload_id)


def test_conditional_complete(storage: Storage, remote: tuple[str, dict[str, Any]]) -> None:
    blobs = _parts(2, seed=4)
    upload_id, refs = _upload(storage, "seg/cond", blobs)
    expected = Expected(size=sum(map(len, blobs)), etag=multipart_etag([r.etag for r in refs]))
    storage.complete("seg/cond", upload_id, refs, expected)
    # The response was lost and the client completes again: accepted, same object.
    again = storage.complete("seg/cond", upload_id, refs, expected)
    assert again.etag == expected.etag
    # Another upload for the same key must not overwrite the object.
    other = _parts(2, seed=5)
    upload2, refs2 = _upload(storage, "seg/cond", other)
    with pytest.raises(ObjectExistsError, match="seg/cond"):
        storage.complete("seg/cond", upload2, refs2)
    assert remote_bytes(remote, "seg/cond") == b"".join(blobs)
    storage.abort("seg/cond", upload2)
    # A single PUT is conditional too.
    with pytest.raises(ObjectExistsError):
        storage.put("seg/cond", payload(b"different"))
    assert remote_bytes(remote, "seg/cond") == b"".join(blobs)


def test_unknown_upload_id(storage: Storage) -> None:
    blobs = _parts(2, seed=6)
    upload_id, refs = _upload(storage, "seg/gone", blobs)
    storage.abort("seg/gone", upload_id)
    with pytest.raises(NoSuchUploadError, match="seg/gone"):
        storage.complete("seg/gone", upload_id, refs)
    with pytest.raises(NoSuchUploadError):
        storage.upload_part("seg/gone", upload_id, 1, payload(blobs[0]))


@pytest.mark.parametrize(
    "case",
    ["small-middle", "descending", "duplicate", "zero", "too-many", "empty"],
)
def test_part_rules_are_enforced_before_any_remote_call(storage: Storage, case: str) -> None:
    upload_id = storage.start_upload("seg/rules")
    big, small = payload(b"x" * PART), payload(b"y" * 10)
    if case == "zero":
        with pytest.raises(PartRuleError, match="part number"):
            storage.upload_part("seg/rules", upload_id, 0, small)
        assert storage.list_parts("seg/rules", upload_id) == []
    else:
        r1 = storage.upload_part(
            "seg/rules", upload_id, 1, small if case == "small-middle" else big
        )
        r2 = storage.upload_part("seg/rules", upload_id, 2, big)
        parts = {
            "small-middle": [r1, r2],
            "descending": [r2, r1],
            "duplicate": [r1, r1],
            "too-many": [PartRef(i, r1.etag) for i in range(1, 10_002)],
            "empty": [],
        }[case]
        with pytest.raises(PartRuleError):
            storage.complete("seg/rules", upload_id, parts)
    assert storage.head("seg/rules") is None
    storage.abort("seg/rules", upload_id)


def test_empty_and_one_byte_objects(storage: Storage, remote: tuple[str, dict[str, Any]]) -> None:
    empty = storage.put("tiny/empty", payload(b""))
    assert (empty.size, empty.etag) == (0, payload(b"").md5)
    one = storage.put("tiny/one", payload(b"\x00"))
    assert (one.size, one.etag) == (1, payload(b"\x00").md5)
    assert remote_bytes(remote, "tiny/empty") == b""
    assert remote_bytes(remote, "tiny/one") == b"\x00"
    head = storage.head("tiny/one")
    assert head is not None and head.size == 1 and head.etag == payload(b"\x00").md5
    # A one-byte object through a one-part multipart upload.
    upload_id, refs = _upload(storage, "tiny/multi", [b"z"])
    info = storage.complete("tiny/multi", upload_id, refs)
    assert info.size == 1 and info.etag == multipart_etag([md5(payload(b"z"))])


@pytest.mark.parametrize("key", ["unicode/журнал-日志-ß", "spaces/a segment file", "deep/a/b/c/d"])
def test_unusual_keys(storage: Storage, remote: tuple[str, dict[str, Any]], key: str) -> None:
    blobs = _parts(2, seed=7)
    upload_id, refs = _upload(storage, key, blobs)
    assert [u.key for u in storage.list_uploads()] == [key]
    storage.complete(key, upload_id, refs)
    assert remote_bytes(remote, key) == b"".join(blobs)
    assert storage.read(key, 5, 105) == b"".join(blobs)[5:105]
    info = storage.head(key)
    assert info is not None and info.etag is not None
    storage.delete_if_match(key, info.etag)
    assert storage.head(key) is None


def test_read_ranges(storage: Storage) -> None:
    data = random.Random(8).randbytes(3000)
    storage.put("r/x", payload(data))
    assert storage.read("r/x", 0, 3000) == data
    assert storage.read("r/x", 1000, 1001) == data[1000:1001]
    assert storage.read("r/x", 2999, 3000) == data[-1:]
    assert storage.read("r/x", 10, 10) == b""


def test_hidden_objects_are_written_read_and_listed_by_name_prefix(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    assert storage.read_hidden("records/ab/abc.1.json") is None
    assert storage.list_hidden("records/ab/abc.") == []
    for name in ("records/ab/abc.1.json", "records/ab/abc.2.json", "records/ab/abd.1.json"):
        storage.write_hidden(name, name.encode())
    storage.write_hidden("records/ab/abc.x/deeper.json", b"not at this level")
    storage.write_hidden("records/ac/abc.1.json", b"another folder")
    assert storage.read_hidden("records/ab/abc.2.json") == b"records/ab/abc.2.json"
    assert storage.list_hidden("records/ab/abc.") == [
        "records/ab/abc.1.json",
        "records/ab/abc.2.json",
    ]
    assert storage.list_hidden("records/ab/") == [
        "records/ab/abc.1.json",
        "records/ab/abc.2.json",
        "records/ab/abd.1.json",
    ]
    assert storage.list_hidden("records/zz/") == []
    # Hidden objects are never objects: not listed, not visible to a reader listing the root.
    assert storage.list_objects() == []
    assert visible_keys(remote) == []


def test_put_many_answers_each_put_in_order(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    """A batch of PUTs (the group commit's) is each PUT as :meth:`Storage.put` alone would do it:
    new objects written whole, an object already at a key kept (refused unless it is ours, as
    after a lost response), one item's failure its own answer, the answers in order."""
    rng = random.Random(9)
    blobs = [rng.randbytes(size) for size in (0, 1, 1000, 70_000, 5)]
    storage.put("many/ours", payload(blobs[2]))  # ours already: a lost response
    storage.put("many/foreign", payload(b"someone else's"))
    keys = ["many/a", "many/b", "many/ours", "many/foreign", "many/e"]
    answers = put_many(
        storage,
        [
            PutItem(k, payload(b), {"n": str(i)})
            for i, (k, b) in enumerate(zip(keys, blobs, strict=True))
        ],
        concurrency=3,
    )
    assert [a.sent for a in answers] == [True] * 5
    assert isinstance(answers[3].error, ObjectExistsError)
    assert "many/foreign" in str(answers[3].error)
    assert remote_bytes(remote, "many/foreign") == b"someone else's"
    for i in (0, 1, 2, 4):
        info = answers[i].info
        assert answers[i].error is None and info is not None
        assert (info.key, info.size, info.etag) == (keys[i], len(blobs[i]), payload(blobs[i]).md5)
        assert remote_bytes(remote, keys[i]) == blobs[i]
        head = storage.head(keys[i])
        assert head is not None and (head.size, head.etag) == (info.size, info.etag)


def test_put_many_told_to_stop_sends_nothing_more(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    answers = put_many(
        storage,
        [PutItem(f"stop/{i}", payload(b"x" * i)) for i in range(4)],
        concurrency=2,
        stop=lambda: True,
    )
    assert [a.sent for a in answers] == [False] * 4
    assert [(a.info, a.error) for a in answers] == [(None, None)] * 4
    assert visible_keys(remote) == []
