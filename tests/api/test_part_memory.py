"""No whole part in memory: sealing on S3 streams each part from the file.

4 parts of 8 MiB at concurrency 4: a seal that held whole parts (the digest pass, or the bodies
in flight) would allocate at least one 8 MiB part, and about four at once. Measured with
tracemalloc in a process of its own (:mod:`tests.api.seal_memory`; moto's in-process server keeps
what it receives, which would count here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.api.conftest import remote_bytes

MiB = 1024 * 1024
PART = 8 * MiB


def test_sealing_four_8_mib_parts_allocates_well_under_one_part(
    manifest_url: str, at_head: None, s3_remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, options = s3_remote
    path = tmp_path / "seg"
    data = os.urandom(4 * PART)
    path.write_bytes(data)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.api.seal_memory",
            manifest_url,
            url,
            json.dumps(options),
            str(path),
            str(PART),
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["parts"] == 4 and result["verified"], result
    # Streaming holds a few 256 KiB blocks per part in flight (about 2.5 MiB measured for all
    # four); whole parts held would be >= 8 MiB (32 MiB measured before streaming).
    assert result["peak"] < PART // 2, result
    assert remote_bytes(s3_remote, "mem/0") == data
