"""A recovery worker that stops itself (SIGSTOP, the whole process: heartbeat included) right
before it sends a conditional delete; run as its own process by test_no_blind_delete.

Usage: python -m tests.api.frozen_worker MANIFEST_URL REMOTE_URL OPTIONS_JSON MIN_PART_SIZE
Prints the recovery report as JSON when it is continued and done.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import uploader
from uploader.storage import open_storage


class StopBeforeDelete:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def delete_if_match(self, key: str, etag: str) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen here until the test sends SIGCONT
        self.inner.delete_if_match(key, etag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    manifest_url, remote_url, options, min_part = sys.argv[1:5]
    part = int(min_part)
    inner = open_storage(remote_url, json.loads(options), min_part_size=part)
    with uploader.open(
        manifest_url,
        remote_url,
        storage=StopBeforeDelete(inner),
        part_size=part,
        min_part_size=part,
        lease_seconds=30,
    ) as store:
        report = store.recover()
    print(json.dumps(report.as_dict()))


if __name__ == "__main__":
    main()
