"""Keys the remote cannot store are refused before anything is recorded (issue 16).

S3 counts a key from the bucket (prefix + "/" + key, 1024 bytes); a local disk limits each name
(``PC_NAME_MAX``) and the whole path (``PC_PATH_MAX``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import StoreFactory, remote_bytes
from tests.api.test_bad_input import _rows
from uploader.errors import InvalidKeyError


def _refused(store: Any, key: str, path: Path) -> InvalidKeyError:
    before = _rows(store)
    with pytest.raises(InvalidKeyError) as info:
        store.segment(key, path)
    assert info.value.exit_code == 2
    assert _rows(store) == before  # nothing recorded
    assert store.manifest.segment(key) is None
    return info.value


@pytest.mark.parametrize("remote", ["s3"], indirect=True)
def test_s3_counts_the_prefix(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    assert remote[0].endswith("/root")  # the remote's prefix: "root/" is 5 bytes of every key
    path = tmp_path / "seg"
    path.write_bytes(b"abc")
    with make_store() as store:
        too_long = "k/" + "x" * 1018  # 1020 bytes: within 1024 alone, 1025 with the prefix
        err = _refused(store, too_long, path)
        assert "1020 bytes" in str(err) and "1025 bytes" in str(err) and "1024" in str(err)
        assert "'root'" in str(err)
        # Multi-byte characters count as their UTF-8 bytes.
        _refused(store, "k/" + "\u00e9" * 510, path)  # 1022 bytes, 1027 with the prefix

        fits = "k/" + "x" * 1017  # 1019 + 5 = 1024 bytes: accepted and stored
        res = store.segment(fits, path).seal().result(timeout=60)
        assert res.verified
        assert remote_bytes(remote, fits) == b"abc"


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_file_components_fit_the_filesystem(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    root = remote[0].split("://", 1)[1]
    name_max = os.pathconf(root, "PC_NAME_MAX")
    path = tmp_path / "seg"
    path.write_bytes(b"abc")
    with make_store() as store:
        long_last = "log/" + "x" * (name_max + 1)
        err = _refused(store, long_last, path)
        assert f"{name_max + 1} bytes" in str(err) and str(name_max) in str(err)
        _refused(store, "y" * (name_max + 1) + "/seg", path)  # a directory component too
        _refused(store, "log/" + "\u00e9" * (name_max // 2 + 1), path)  # UTF-8 bytes count

        # The longest component the filesystem takes is accepted, sealed and verified; so is
        # the 252-byte component of the issue (every recovery pass used to fail on it).
        for key in ("log/" + "z" * name_max, "log/" + "w" * 252):
            res = store.segment(key, path).seal().result(timeout=60)
            assert res.verified
            assert remote_bytes(remote, key) == b"abc"
        assert store.recover().failed == ()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_file_whole_path_fits_the_filesystem(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"abc")
    with make_store() as store:
        staged = store.storage.inner  # type: ignore[attr-defined]
        # A filesystem whose paths hold the root, "/" and 20 bytes of key (PATH_MAX counts a NUL).
        limit = len(staged.root.encode()) + 1 + 20
        staged.path_max = limit + 1
        err = _refused(store, "a/" + "b" * 19, path)  # 21 bytes of key: one too many
        assert f"{limit + 1} bytes" in str(err) and f"the limit is {limit}" in str(err)
        assert store.segment("a/" + "b" * 18, path).seal().result(timeout=60).verified
