"""Each command imports what it uses: `--help` no database and no filesystem, `db current` no
Alembic, a command on a file:// remote no s3fs, no command the ORM, none but a metrics one
prometheus_client (see tests/test_imports.py for the library)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cli.conftest import uploader_env
from tests.test_imports import HEAVY, NEVER, S3_ONLY

#: The console script, with what it imported written to a file when it exits.
CLI = f"""
import json, sys
report = sys.argv[1]
sys.argv = ["uploader", *sys.argv[2:]]
code = 0
try:
    from uploader.cli import main
    main()
except SystemExit as exc:
    code = exc.code
finally:
    with open(report, "w") as f:
        json.dump(sorted(m for m in {HEAVY!r} if m in sys.modules), f)
sys.exit(code)
"""


def cli(tmp_path: Path, env: dict[str, str], *args: str) -> set[str]:
    """Run ``uploader ARGS`` (exit 0 expected); the heavy modules it imported."""
    report = tmp_path / "loaded.json"
    out = subprocess.run(
        [sys.executable, "-c", CLI, str(report), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return set(json.loads(report.read_text()))


def test_help_loads_no_database_and_no_filesystem(home: Path, tmp_path: Path) -> None:
    for args in (("--help",), ("ship", "--help"), ("db", "--help")):
        seen = cli(tmp_path, uploader_env(home), *args)
        assert {"typer", "rich"} <= seen, args
        assert not seen & (
            {"sqlalchemy", "fsspec", "alembic", "prometheus_client", "psycopg"} | S3_ONLY
        ), args


def test_each_command_loads_what_it_uses(manifest_url: str, home: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "seg").write_bytes(b"segment bytes")
    env = uploader_env(home, UPLOADER_MANIFEST=manifest_url, UPLOADER_REMOTE=f"file://{remote}")
    pg = {"psycopg"} if manifest_url.startswith("postgresql") else set()
    never = NEVER | S3_ONLY | {"prometheus_client"}

    # Migrating is what loads Alembic; reading the revision is not.
    seen = cli(tmp_path, env, "db", "upgrade")
    assert "alembic" in seen
    assert not seen & (never | {"fsspec"})
    seen = cli(tmp_path, env, "db", "current")
    assert not seen & (never | {"alembic", "fsspec"})
    assert {"sqlalchemy"} | pg <= seen

    # The store's commands load the remote's filesystem (fsspec), never s3fs for file://.
    for args in (("ship", str(data / "seg")), ("recover",), ("verify",), ("sweep",)):
        seen = cli(tmp_path, env, *args)
        assert {"sqlalchemy", "fsspec"} | pg <= seen, args
        assert not seen & (never | {"alembic"}), args
    assert (remote / "seg").read_bytes() == b"segment bytes"  # shipped, verified

    # status reads the manifest only.
    seen = cli(tmp_path, env, "status")
    assert {"sqlalchemy"} | pg <= seen
    assert not seen & (never | {"alembic", "fsspec"})
