"""``--help`` speaks the operator's words: URL, BYTES, SECONDS, FILE, never a Python type."""

from __future__ import annotations

import re
from typing import Any

import typer
from typer.testing import CliRunner

from uploader.cli import app

PYTHON_TYPES = re.compile(r"<(str|int|float|bool|path|list\[|float range|int range)[^>]*>")


def _commands() -> list[list[str]]:
    group: Any = typer.main.get_command(app)  # typer's own click: duck-typed
    found: list[list[str]] = [[]]
    for name, cmd in group.commands.items():
        found.append([name])
        found += [[name, sub] for sub in getattr(cmd, "commands", {})]
    return found


def test_help_shows_metavars_not_python_types() -> None:
    runner = CliRunner()
    commands = _commands()
    assert ["ship"] in commands and ["db", "upgrade"] in commands
    for argv in commands:
        res = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "100"})
        assert res.exit_code == 0, (argv, res.output)
        assert not PYTHON_TYPES.search(res.output), (argv, PYTHON_TYPES.findall(res.output))
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "100"}).output
    for shown in ("--manifest URL", "--remote URL", "--part-size BYTES", "--lease-seconds SECONDS"):
        assert shown in top, top
    ship = runner.invoke(app, ["ship", "--help"], env={"COLUMNS": "100"}).output
    assert "{FILE}..." in ship and "--key-prefix PREFIX" in ship
    verify = runner.invoke(app, ["verify", "--help"], env={"COLUMNS": "100"}).output
    assert "--interval SECONDS" in verify and "--rate BYTES/S" in verify
    recover = runner.invoke(app, ["recover", "--help"], env={"COLUMNS": "100"}).output
    assert "--stuck-passes N" in recover and "--max-reuploads N" in recover


def test_numbers_out_of_range_are_refused() -> None:
    runner = CliRunner()
    for argv in (
        ["--concurrency", "0", "status"],
        ["sweep", "--older-than", "-5"],
        ["recover", "--metrics-port", "70000"],
        ["recover", "--stuck-passes", "0"],
        ["recover", "--max-reuploads", "-1"],
        ["verify", "--batch", "0"],
    ):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2, (argv, res.output)


def test_the_checksum_option_is_a_global_option_checked_before_anything_runs() -> None:
    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "100"}).output
    assert "--checksum MODE" in top and "crc32c" in top
    res = runner.invoke(app, ["--checksum", "sha1", "status"])
    assert res.exit_code == 2, res.output
