"""Messages about local files state the file's real size (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from uploader.digest import read_bytes
from uploader.errors import LocalFileError


@pytest.mark.parametrize(("size", "start", "end"), [(3, 10, 20), (15, 10, 20), (0, 5, 6)])
def test_shorter_file_message_states_the_real_size(
    tmp_path: Path, size: int, start: int, end: int
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"s" * size)
    with pytest.raises(LocalFileError) as info:
        read_bytes(str(path), start, end)
    message = str(info.value)
    assert f"shorter ({size} bytes)" in message, message
    assert f"[{start}, {end})" in message
    assert not info.value.retryable
