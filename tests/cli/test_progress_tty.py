"""On a terminal: ``ship``'s lines print above its progress bar, never glued onto it."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

from tests.cli.conftest import uploader_cmd, uploader_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PART = 1024 * 1024


def _screen_lines(raw: str) -> list[str]:
    """What each line shows: escapes dropped, a carriage return starts the line over."""
    text = ANSI.sub("", raw).replace("\r\n", "\n")  # the terminal turns \n into \r\n
    return [line.split("\r")[-1] for line in text.split("\n")]


def test_verified_lines_print_above_the_bar_on_a_terminal(home: Path, tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"{i:04d}"
        f.write_bytes(os.urandom(2 * PART + i))
        files.append(str(f))
    master, slave = pty.openpty()
    env = uploader_env(home, TERM="xterm-256color", COLUMNS="100", LINES="40")
    args = ("--part-size", str(PART), "--min-part-size", str(PART), "ship", *files)
    proc = subprocess.Popen(
        uploader_cmd(*args), env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    raw = b"".join(chunks).decode(errors="replace")
    assert "━" in raw, raw  # a bar was drawn: this really ran on a terminal
    lines = _screen_lines(raw)
    verified = [line for line in lines if "verified 000" in line]
    assert len(verified) == 3, lines
    for line in verified:
        assert re.match(r"verified 000\d \(\d+ bytes, shipped\)\s*$", line), repr(line)
