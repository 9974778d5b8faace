"""The S3 part body shares the part's bytes: aiohttp's sizing must not copy an in-flight part."""

from __future__ import annotations

import os

from uploader.storage.s3 import _PartBody


def test_getbuffer_is_a_view_of_the_same_bytes_not_a_copy() -> None:
    data = os.urandom(1 << 20)
    body = _PartBody(data)
    with body.getbuffer() as view:
        assert view.obj is data  # a view over the caller's bytes object itself
        assert view.readonly
        assert len(view) == len(data)


def test_body_reads_back_exactly_and_rewinds_for_a_resend() -> None:
    data = os.urandom(300_000)
    body = _PartBody(data)
    chunks = []
    while chunk := body.read(65_536):
        chunks.append(chunk)
    assert b"".join(chunks) == data
    body.seek(0)  # what a client does before sending the same part again
    assert body.read() == data
