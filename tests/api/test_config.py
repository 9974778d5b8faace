"""One typed configuration: uploader.open, Store and the CLI build the same StoreConfig."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

import uploader
from uploader.config import StoreConfig, UploadMode, VerifyMode, resolve
from uploader.errors import UsageError

PART = 64 * 1024


def test_config_is_frozen_and_checked() -> None:
    cfg = StoreConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.part_size = 1  # type: ignore[misc]
    assert cfg.verify is VerifyMode.ETAG
    for bad, word in (
        (StoreConfig(concurrency=0), "concurrency"),
        (StoreConfig(part_size=0), "part_size"),
        (StoreConfig(lease_seconds=0), "lease_seconds"),
        (StoreConfig(lease_seconds=float("inf")), "lease_seconds"),
        (StoreConfig(min_part_size=-1), "min_part_size"),
    ):
        with pytest.raises(UsageError, match=word):
            bad.check()
    with pytest.raises(UsageError, match="verify must be one of 'etag', 'deep'"):
        StoreConfig(verify="sha1")  # type: ignore[arg-type]
    # The CLI's plain strings become the enum; enums compare equal to their strings.
    assert StoreConfig(verify="deep").verify is VerifyMode.DEEP  # type: ignore[arg-type]
    recorded: str = "put"  # as a manifest row holds it
    assert recorded == UploadMode.PUT


def test_keyword_arguments_override_the_config_and_none_means_not_given() -> None:
    base = StoreConfig(part_size=PART, concurrency=3)
    cfg = resolve(base, concurrency=7, lease_seconds=None)
    assert (cfg.part_size, cfg.concurrency, cfg.lease_seconds) == (PART, 7, base.lease_seconds)
    assert resolve(base) is base


def test_open_and_store_run_with_one_config(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = StoreConfig(part_size=PART, concurrency=2, lease_seconds=12.5, min_part_size=PART)
    with uploader.open(
        f"sqlite:///{tmp_path / 'm.db'}", f"file://{remote}", config=cfg, verify="deep", node="n1"
    ) as store:
        # The config a store reports is the one it runs with (names resolved, overrides applied).
        assert store.config.part_size == PART and store.part_size == PART
        assert store.config.verify is VerifyMode.DEEP and store.verify_mode is VerifyMode.DEEP
        assert store.config.node == "n1" == store.node
        assert store.config.worker == store.worker and store.worker
        assert store.keeper.lease_seconds == 12.5
        assert store.transport is not None
        path = tmp_path / "seg"
        path.write_bytes(b"x" * (PART + 5))
        assert store.segment("k", path).seal().result().verified


def test_bad_config_is_refused_before_the_manifest_is_created(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with pytest.raises(UsageError, match="concurrency"):
        uploader.open(f"sqlite:///{db}", f"file://{tmp_path}", concurrency=0)
    assert not db.exists()


def test_cli_global_options_become_the_store_config(tmp_path: Path) -> None:
    """The CLI's global options build the library's StoreConfig, and the store it opens runs
    with it; a command's own option (here the worker name) overrides its field."""
    from uploader.cli import Context

    ctx = Context(
        manifest=None,
        remote=None,
        storage_options=None,
        home=str(tmp_path / "home"),
        part_size=PART,
        concurrency=3,
        debug=False,
        lease_seconds=9.0,
        min_part_size=PART,
    )
    assert ctx.config() == StoreConfig(
        part_size=PART, concurrency=3, lease_seconds=9.0, min_part_size=PART
    )
    with ctx.open(worker="w1") as store:
        assert store.config == ctx.config().with_(node=store.node, worker="w1")
    bad = dataclasses.replace(ctx, lease_seconds=0.0)
    with pytest.raises(UsageError, match="lease_seconds"):
        bad.open()


def test_checksum_setting() -> None:
    from uploader.config import ChecksumMode

    assert StoreConfig().checksum is ChecksumMode.AUTO
    # The CLI's (and a caller's) plain strings, any case, become the enum.
    assert StoreConfig(checksum="CRC32C").checksum is ChecksumMode.CRC32C  # type: ignore[arg-type]
    assert resolve(StoreConfig(), checksum="md5").checksum is ChecksumMode.MD5
    with pytest.raises(UsageError, match="checksum must be one of 'auto', 'md5', 'crc32c'"):
        StoreConfig(checksum="sha1")  # type: ignore[arg-type]


def test_checksum_reaches_the_store_and_crc32c_needs_a_remote_that_keeps_it(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    path = tmp_path / "seg"
    path.write_bytes(b"x" * 10)
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with uploader.open(url, f"file://{remote}", checksum="md5") as store:
        assert store.config.checksum is uploader.ChecksumMode.MD5
        assert store.new_segment_checksum() == "md5"
    # A local directory keeps no CRC32C: auto is md5 there, crc32c is refused before anything
    # is recorded.
    with uploader.open(url, f"file://{remote}") as store:
        assert store.new_segment_checksum() == "md5"
    with uploader.open(url, f"file://{remote}", checksum="crc32c") as store:
        with pytest.raises(UsageError, match="did not prove that it keeps"):
            store.segment("k", path)
        assert store.manifest.segment("k") is None


@pytest.mark.parametrize(
    ("setting", "name", "says"),
    [
        ("node", "n" * 256, "node name 'n+'... is 256 characters; the manifest holds at most 255"),
        ("worker", "w" * 256, "worker name 'w+'... is 256 characters"),
        # 200 characters, but 1,800 bytes percent-encoded in every object's metadata.
        ("node", "中" * 200, "takes 1800 bytes percent-encoded in every object's metadata"),
    ],
)
def test_a_name_the_manifest_or_the_metadata_cannot_hold_is_refused_before_anything(
    tmp_path: Path, setting: str, name: str, says: str
) -> None:
    db = tmp_path / "m.db"
    names: dict[str, Any] = {setting: name}
    with pytest.raises(UsageError, match=says):
        uploader.open(f"sqlite:///{db}", f"file://{tmp_path}", **names)
    assert not db.exists()
    if setting == "node":  # where an earlier version's segments under that name go
        with pytest.raises(UsageError, match=r"`uploader db rename-node OLD NEW`\)$"):
            uploader.open(f"sqlite:///{db}", f"file://{tmp_path}", **names)
    # Just within: 255 characters; 1,530 bytes percent-encoded (every 255-character name in a
    # two-byte script, 170 characters of CJK).
    for fits in ("é" * 255, "中" * 170) if setting == "node" else (name[:-1],):
        given: dict[str, Any] = {setting: fits}
        assert StoreConfig(**given).check()


def test_a_default_node_name_too_long_is_refused_and_the_default_worker_fits(
    tmp_path: Path, manifest_url: str, at_head: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    monkeypatch.setenv("UPLOADER_NODE", "h" * 300)
    with pytest.raises(UsageError, match="node= or UPLOADER_NODE"):
        uploader.open(f"sqlite:///{tmp_path / 'm.db'}", f"file://{remote}")
    assert not (tmp_path / "m.db").exists()
    # A node name as long as the manifest allows: the default worker name (node:pid:random)
    # keeps the pid and the random part and fits too, on PostgreSQL's VARCHAR(255) as well.
    monkeypatch.setenv("UPLOADER_NODE", "h" * 255)
    path = tmp_path / "seg"
    path.write_bytes(b"x" * (PART + 5))
    with uploader.open(
        manifest_url, f"file://{remote}", part_size=PART, min_part_size=PART
    ) as store:
        assert store.node == "h" * 255
        assert len(store.worker) == 255 and store.worker.startswith("h" * 200)
        assert store.worker.split(":")[1] == str(os.getpid())
        assert store.segment("k", path).seal().result().verified
        seg = store.manifest.segment("k")
        assert seg is not None and seg.node == "h" * 255
        assert {e.worker for e in store.manifest.events(seg.id)} == {store.worker}
