"""The ``append`` and ``whole`` formats, and the format registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from uploader.errors import UsageError
from uploader.formats import FORMAT_NAMES, Scan, formats, get_format


def test_registry_names_the_formats() -> None:
    assert sorted(formats()) == sorted(FORMAT_NAMES)
    for name, f in formats().items():
        assert f.name == name
    with pytest.raises(
        UsageError, match=r"unknown segment format 'kafka'.*append, rocketmq, whole"
    ):
        get_format("kafka")
    assert get_format("rocketmq").preallocated
    assert not get_format("append").preallocated and not get_format("whole").preallocated


def test_append_is_the_file_size_complete_once_rolled(tmp_path: Path) -> None:
    p = tmp_path / "00000000000000000000"
    p.write_bytes(b"x" * 1234)
    f = get_format("append")
    assert f.begun(str(p))
    assert f.scan(str(p), 0, rolled=False) == Scan(1234, False, None)
    assert f.scan(str(p), 1000, rolled=True) == Scan(1234, True, None)


def test_whole_is_nothing_until_rolled(tmp_path: Path) -> None:
    p = tmp_path / "000000010000000000000001"
    p.write_bytes(b"w" * 999)
    f = get_format("whole")
    assert f.scan(str(p), 0, rolled=False) == Scan(0, False, None)
    assert f.scan(str(p), 0, rolled=True) == Scan(999, True, None)
