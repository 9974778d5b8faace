"""README.md's library example, run as written against S3 (moto over HTTP): the object lands at
the path its comment names, and nowhere else (the key is the path under the remote root)."""

from __future__ import annotations

import contextlib
import io
import random
import re
from pathlib import Path

import boto3

README = Path(__file__).resolve().parents[2] / "README.md"
MiB = 2**20


def _library_example() -> str:
    text = README.read_text()
    section = text.split("## Library", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md has no python block under ## Library"
    return match.group(1)


def test_the_readme_library_example_writes_the_object_it_names(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    code = _library_example()
    # What the example says it writes, in its own words.
    promised = re.search(r"# key = .*?: (s3://\S+)", code)
    assert promised, code
    local = re.search(r'store\.segment\("[^"]+", "([^"]+)"\)', code)
    assert local, code
    data = random.Random(7).randbytes(9 * MiB)  # one whole part for commit(), the rest for seal()
    segment = tmp_path / Path(local.group(1)).name
    segment.write_bytes(data)

    # Only the places of this machine change: the manifest file, the endpoint, the bucket, the
    # local file. Each must be found, so the example cannot drift from what is replaced here.
    for old, new in (
        ('"sqlite:///uploader.db"', f'"sqlite:///{tmp_path}/uploader.db"'),
        ('"http://127.0.0.1:9000"', f'"{moto_endpoint}"'),
        ('"s3://bucket/', f'"s3://{s3_bucket}/'),
        (f'"{local.group(1)}"', f'"{segment}"'),
    ):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})

    bucket, _, key = promised.group(1).removeprefix("s3://").partition("/")
    assert bucket == "bucket"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    # Exactly the promised path (no doubled prefix), beside the uploader's own hidden records.
    assert [k for k in listed if "/.uploader/" not in k] == [key], listed
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == data
    assert printed.getvalue() == f"may delete {segment}\n"
