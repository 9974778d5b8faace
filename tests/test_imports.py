"""What importing the library and opening a store load: nothing a caller does not use.

The fixed memory cost comes before any byte is sent (SQLAlchemy's ORM, s3fs/aiobotocore/aiohttp,
typer/rich, Alembic are each megabytes), so each is loaded only where it is used: the manifest
runs Core statements (no ORM at all), s3fs only for an ``s3://`` remote, typer and rich only in
the CLI, prometheus_client only for metrics, Alembic only to migrate, psycopg only for a
PostgreSQL URL. Each check runs in a fresh interpreter (this one has loaded everything).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import TEST_MIN_PART_SIZE, migrate
from tests.test_modules import PACKAGE, _module_level, _modules

#: The heavy modules, each loaded only by what uses it.
HEAVY = (
    "sqlalchemy",
    "sqlalchemy.orm",
    "fsspec",
    "s3fs",
    "aiobotocore",
    "botocore",
    "aiohttp",
    "rich",
    "typer",
    "prometheus_client",
    "alembic",
    "psycopg",
)
#: Never needed by the library or the CLI (the manifest's tables are Core ``Table``s).
NEVER = {"sqlalchemy.orm"}
#: Loaded only by the CLI, the metrics, a migration and an S3 remote.
CLI_ONLY = {"rich", "typer"}
S3_ONLY = {"s3fs", "aiobotocore", "botocore", "aiohttp"}

PROBE = """
import json, sys

def loaded():
    return sorted(m for m in {heavy!r} if m in sys.modules)

{body}
"""


def probe(body: str, *args: str) -> Any:
    """Run ``body`` in a fresh interpreter (``loaded()`` lists the heavy modules imported so
    far; ``sys.argv[1:]`` are ``args``); what its last line printed, as JSON."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY, body=body), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_uploader_loads_none_of_them() -> None:
    seen = probe(
        "import uploader\n"
        "assert uploader.SegmentState.VERIFIED and uploader.UploaderError and uploader.Status\n"
        "before = loaded()\n"
        "uploader.Store  # the lazy names load the store on first use\n"
        "print(json.dumps([before, loaded()]))\n"
    )
    before, after = seen
    assert before == []
    # The probe sees an import when there is one: the store needs SQLAlchemy Core (only).
    assert "sqlalchemy" in after
    assert not set(after) & (NEVER | CLI_ONLY | S3_ONLY | {"prometheus_client", "alembic"})


SHIP = """
import uploader
manifest, remote, options, path = sys.argv[1:5]
with uploader.open(manifest, remote, storage_options=json.loads(options),
                   part_size={part}, min_part_size={part}) as store:
    result = store.segment("log/0", path).seal().result(timeout=60)
    assert result.verified, result
print(json.dumps(loaded()))
"""


def _ship(manifest_url: str, remote: str, options: dict[str, Any], tmp_path: Path) -> set[str]:
    """Open a store in a fresh interpreter, seal a segment of 2.5 parts to ``verified``; the
    heavy modules it loaded."""
    migrate(manifest_url)
    path = tmp_path / "seg"
    path.write_bytes(b"x" * (5 * TEST_MIN_PART_SIZE // 2))
    body = SHIP.format(part=TEST_MIN_PART_SIZE)
    return set(probe(body, manifest_url, remote, json.dumps(options), str(path)))


def test_a_store_on_a_file_remote_does_not_load_s3fs(manifest_url: str, tmp_path: Path) -> None:
    (tmp_path / "remote").mkdir()
    seen = _ship(manifest_url, f"file://{tmp_path}/remote", {}, tmp_path)
    assert {"sqlalchemy", "fsspec"} <= seen
    assert not seen & (NEVER | CLI_ONLY | S3_ONLY | {"prometheus_client", "alembic"})
    # psycopg for a PostgreSQL manifest only.
    assert ("psycopg" in seen) == manifest_url.startswith("postgresql")


def test_a_store_on_an_s3_remote_loads_s3fs_and_no_more(
    manifest_url: str, s3_remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, options = s3_remote
    seen = _ship(manifest_url, url, options, tmp_path)
    assert {"sqlalchemy", "s3fs", "aiobotocore", "botocore", "aiohttp"} <= seen
    assert not seen & (NEVER | CLI_ONLY | {"prometheus_client", "alembic"})
    assert ("psycopg" in seen) == manifest_url.startswith("postgresql")


# --- who imports what, read from the source ------------------------------------------------------

#: A heavy package and the only modules that may import it at module level (prefixes of dotted
#: names); anywhere else it is imported inside the function that needs it.
OWNERS = {
    "typer": ("uploader.cli",),
    "rich": ("uploader.cli", "uploader.demo"),
    "prometheus_client": ("uploader.metrics",),
    "s3fs": ("uploader.storage.s3",),
    "aiobotocore": ("uploader.storage.s3",),
    "botocore": ("uploader.storage.s3",),
    "aiohttp": ("uploader.storage.s3",),
    "alembic": (),
    "psycopg": (),
}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level or node.module is None:
        return []
    return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]


def test_heavy_packages_are_imported_at_module_level_only_by_their_owners() -> None:
    wrong = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level(tree.body):
            for target in _imported(node):
                owners = OWNERS.get(target.split(".")[0])
                if owners is not None and not name.startswith(owners):
                    wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_sqlalchemy_orm_is_imported_nowhere() -> None:
    """Not even inside a function: the manifest's tables are Core ``Table``s."""
    sources = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "migrations").rglob("*.py")]
    users = [
        str(path)
        for path in sources
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(t == "sqlalchemy.orm" or t.startswith("sqlalchemy.orm.") for t in _imported(node))
    ]
    assert users == []
