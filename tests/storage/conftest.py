"""One storage per backend (moto S3 over HTTP, local files, memory), without retries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import TEST_MIN_PART_SIZE
from uploader.digest import Payload, checksum
from uploader.storage import Storage, open_storage


@pytest.fixture
def storage(remote: tuple[str, dict[str, Any]]) -> Iterator[Storage]:
    url, options = remote
    st = open_storage(url, dict(options), min_part_size=TEST_MIN_PART_SIZE, retry=None)
    try:
        yield st
    finally:
        st.close()


def payload(data: bytes, start: int = 0) -> Payload:
    md5, crc = checksum(data)
    return Payload(
        path="<test>", start=start, end=start + len(data), data=data, md5=md5, crc32c=crc
    )
