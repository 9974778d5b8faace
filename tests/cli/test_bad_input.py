"""Bad usage and bad input: exit 2 (or 1), one line of error naming what, no traceback, no secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import Run, uploader_env


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def test_unknown_command(run: Run) -> None:
    res = run("frobnicate")
    assert res.returncode == 2
    assert "frobnicate" in res.stderr


def test_unknown_option(run: Run) -> None:
    res = run("status", "--colour")
    assert res.returncode == 2
    assert "--colour" in res.stderr


def test_malformed_storage_options(run: Run, home: Path) -> None:
    secret = "sup3r-s3cret-value"
    res = run("--storage-options", '{"secret": "' + secret + '", ', "status")
    assert res.returncode == 2
    line = _one_line_error(res.stderr)
    assert "not valid JSON" in line
    assert secret not in res.stderr + res.stdout
    env = uploader_env(home, UPLOADER_STORAGE_OPTIONS='["a list"]')
    res = run("sweep", env=env)
    assert res.returncode == 2
    assert "JSON object" in _one_line_error(res.stderr)


def test_unreachable_manifest(run: Run) -> None:
    url = "postgresql://postgres:hunter2pw@127.0.0.1:1/nowhere"
    res = run("--manifest", url, "status")
    assert res.returncode == 1
    line = _one_line_error(res.stderr)
    assert "127.0.0.1:1" in line
    assert "hunter2pw" not in res.stderr + res.stdout


def test_missing_directory_for_watch(run: Run, tmp_path: Path) -> None:
    res = run("watch", str(tmp_path / "nope"), "--once")
    assert res.returncode == 2
    assert "no such directory" in _one_line_error(res.stderr)


def test_directory_of_non_segment_files(run: Run, tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    (d / "README.txt").write_text("not a segment")
    (d / "notes.md").write_text("nor this")
    res = run("watch", str(d), "--once")
    assert res.returncode == 2
    assert "--pattern" in _one_line_error(res.stderr)


@pytest.mark.parametrize("args", [["ship", "/no/such/file"], ["verify", "no/such/key"]])
def test_missing_file_or_key(run: Run, args: list[str]) -> None:
    res = run(*args)
    assert res.returncode == 2
    assert args[1] in _one_line_error(res.stderr)


def test_secrets_in_storage_options_never_printed(
    run: Run, tmp_path: Path, moto_endpoint: str
) -> None:
    secret = "n0t-f0r-y0ur-eyes-7391"
    f = tmp_path / "00000000000000000000"
    f.write_bytes(b"x" * 100)
    options = '{"secret": "' + secret + '", "key": "AKIDEXAMPLE"}'
    s3 = json.dumps({"key": "AKIDEXAMPLE", "secret": secret, "endpoint_url": moto_endpoint})
    for args in (
        ["--debug", "--storage-options", options, "ship", str(f)],
        ["--debug", "--storage-options", options, "status", "--json"],
        # A bucket that does not exist: the error names it, not the credentials.
        [
            "--debug",
            "--storage-options",
            s3,
            "--remote",
            "s3://nowhere-bucket/p",
            "ship",
            "--key-prefix",
            "b/",
            str(f),
        ],
    ):
        res = run(*args)
        assert secret not in res.stdout + res.stderr, args
    assert res.returncode == 1 and "nowhere-bucket" in res.stdout + res.stderr
