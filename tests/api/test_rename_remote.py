"""A node renamed, seen from the remote: an upload under way when it happened goes on and is
rebuilt whole, and a rebuild that meets a node name the manifest cannot hold (an earlier
version's) keeps the object of unknown origin, says why, and goes on (SQLite and PostgreSQL;
moto, file://, memory://)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from tests.api.test_readback import Remote, _rows, _ship, _wipe
from tests.conftest import migrate
from uploader.manifest.repo import Manifest
from uploader.rebuild import rebuild_one
from uploader.states import CommitState, SegmentState
from uploader.storage.base import ObjectInfo


def test_an_upload_under_way_goes_on_under_the_new_name_and_is_rebuilt(
    make_store: StoreFactory, remote: Remote, manifest_url: str, tmp_path: Path
) -> None:
    """The upload was created with the old name in the object's metadata; the record sidecar,
    written before Complete, names the new one. Nothing is sent again, and a rebuild of the
    lost manifest vouches for the object with the record's (the new) name."""
    data = random.Random(3).randbytes(3 * PART + 99)
    path = tmp_path / "seg0"
    path.write_bytes(data[: 2 * PART])
    with make_store(node="host-a") as store:
        store.segment("log/0", path).commit().result(timeout=60)
        seg = store.manifest.segment("log/0")
        assert seg is not None and seg.upload_id is not None
        assert {c.state for c in store.manifest.commits(seg.id)} == {CommitState.UPLOADED}
    # The writer under the old name stopped (its leases given back); the machine is renamed.
    manifest = Manifest.open(manifest_url)
    try:
        [moved] = manifest.rename_node("host-a", "host-b", who="ops", why="renamed")
        parts = manifest.commits(moved.id)
    finally:
        manifest.close()
    assert (moved.upload_id, moved.node) == (seg.upload_id, "host-b")
    assert {c.state for c in parts} == {CommitState.UPLOADED}  # not sent again

    with open(path, "ab") as f:
        f.write(data[2 * PART :])
    with make_store(node="host-b") as store:
        assert store.segment("log/0", path).seal().result(timeout=60).verified
        assert remote_bytes(remote, "log/0") == data
        before = _rows(store)

    _wipe(manifest_url)
    with make_store(node="host-b") as store:
        report = store.rebuild()
        assert report.as_dict()["created"] == 1 and report.ok, report.as_dict()
        assert _rows(store) == before  # node host-b, every part: the record vouches for it


def test_a_rebuild_keeps_an_object_under_a_node_name_too_long_as_unknown(
    make_store: StoreFactory,
    remote: Remote,
    manifest_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An earlier version on SQLite took a 300-character node name and shipped under it."""
    url, options = remote
    earlier = f"sqlite:///{tmp_path / 'earlier.db'}"
    migrate(earlier)
    rng = random.Random(4)
    with monkeypatch.context() as m:
        m.setattr("uploader.config.check_name", lambda *a, **k: None)  # the earlier version
        with uploader.open(
            earlier, url, storage_options=dict(options), node="n" * 300, part_size=PART,
            min_part_size=PART,
        ) as old:  # fmt: skip
            _ship(old, tmp_path, "r/long", rng.randbytes(PART + 5))
    with make_store() as store:
        _ship(store, tmp_path, "r/fine", rng.randbytes(100))
    _wipe(manifest_url)

    with make_store() as store:
        report = store.rebuild(prefix="r/")
        outcomes = {o.key: (o.outcome, o.detail) for o in report.objects}
        assert outcomes["r/fine"][0] == "created"
        assert outcomes["r/long"][0] == "unknown" and not report.ok
        assert "names node 'nnnn" in outcomes["r/long"][1]
        assert "(300 characters), longer than the 255 the manifest holds" in outcomes["r/long"][1]
        kept = store.manifest.segment("r/long")
        assert kept is not None and kept.state is SegmentState.UNKNOWN
        assert [s.key for s in store.deletable()] == ["r/fine"]  # never the kept one


class _OpaqueEtagStorage:
    """A remote that reports an ETag longer than the manifest's column for a foreign object."""

    def head_metadata(self, key: str) -> tuple[ObjectInfo, dict[str, str]]:
        return ObjectInfo(key, 10, "e" * 80), {}

    def list_hidden(self, prefix: str) -> list[str]:
        return []

    def read_hidden(self, name: str) -> None:
        return None


def test_a_rebuild_names_an_etag_too_long_to_store_and_goes_on(manifest_url: str) -> None:
    migrate(manifest_url)
    m = Manifest.open(manifest_url)
    try:
        got = rebuild_one(m, _OpaqueEtagStorage(), "foreign/x", worker="w", part_size=8)  # type: ignore[arg-type]
        assert got.outcome == "unknown" and "e" * 80 in got.detail
        seg = m.segment("foreign/x")
        assert seg is not None and seg.state is SegmentState.UNKNOWN and seg.object_etag is None
    finally:
        m.close()
