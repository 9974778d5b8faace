"""`uploader sweep` on a remote that cannot list unfinished uploads says so (exit 1)."""

from __future__ import annotations

import json

from tests.cli.conftest import Run
from tests.limited_s3 import limited_s3


def test_sweep_says_the_remote_cannot_list_uploads(
    run: Run, moto_endpoint: str, s3_bucket: str
) -> None:
    with limited_s3(moto_endpoint, refuse={"ListMultipartUploads": 501}) as proxy:
        options = json.dumps(
            {
                "key": "testing",
                "secret": "testing",
                "endpoint_url": proxy.url,
                "client_kwargs": {"region_name": "us-east-1"},
            }
        )
        res = run("--storage-options", options, "--remote", f"s3://{s3_bucket}/root", "sweep")
        assert proxy.count("ListMultipartUploads") == 1  # a 501 is not retried
    assert res.returncode == 1, res
    error = res.stderr.strip()
    assert error.startswith("error: sweep: the remote"), error
    assert "cannot list unfinished multipart uploads" in error
    assert "does not support ListMultipartUploads" in error and "lifecycle rule" in error
    assert "worth retrying" not in error and "Traceback" not in error
    assert len(error.splitlines()) == 1
