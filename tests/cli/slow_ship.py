"""The ``uploader`` CLI with a remote whose part uploads are held (for SIGINT tests).

The first ``FREE`` part uploads pass; each later one prints ``in flight part N`` on stderr and
waits until this process gets SIGUSR1 (the test's signal that "the network answered"). The test
waits for those lines: it never sleeps.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

FREE = int(os.environ.get("SLOW_SHIP_FREE", "0"))
_go = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: _go.set())


class _Held:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def upload_part(self, key: str, upload_id: str, number: int, payload: Any) -> Any:
        with self._lock:
            self._calls += 1
            held = self._calls > FREE
        if held:
            os.write(2, f"in flight part {number} of {key}\n".encode())
            _go.wait()
        return self._inner.upload_part(key, upload_id, number, payload)


def main() -> None:
    import uploader.store as store_mod

    real = store_mod.open_storage  # type: ignore[attr-defined]
    store_mod.open_storage = lambda *a, **k: _Held(real(*a, **k))  # type: ignore[attr-defined]
    from uploader.cli import main as cli_main

    cli_main(sys.argv[1:])


if __name__ == "__main__":
    main()
