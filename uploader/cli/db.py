"""``uploader db``: the manifest's schema (create or upgrade it, show its revision), and a node's
segments moved to its new name."""

from __future__ import annotations

from typing import Annotated

import typer

from uploader.cli.app import _ctx, _sqlite_file, caller_name, require_manifest
from uploader.cli.output import JsonOption, _emit_json, out
from uploader.errors import UsageError

db_app = typer.Typer(
    help="The manifest's schema (Alembic underneath), and node renames.", no_args_is_help=True
)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the manifest schema to this version's head."""
    from uploader.manifest import db

    s = _ctx(ctx).settings()
    engine = db.create_manifest_engine(s.manifest)
    try:
        db.connect_check(engine)
        before = db.current_revision(engine)
        db.upgrade(engine)
        after = db.current_revision(engine)
    finally:
        engine.dispose()
    out.print(f"manifest {db.redact(s.manifest)}: {before or 'empty'} -> {after}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the manifest's schema revision and whether it is at head (exit 1 if not)."""
    from uploader.manifest import db

    s = _ctx(ctx).settings(create=False)
    require_manifest(s)
    engine = db.create_manifest_engine(s.manifest)
    try:
        db.connect_check(engine)
        current = db.current_revision(engine)
    finally:
        engine.dispose()
    # The constant the tests tie to the scripts' single head: reading the scripts would import
    # Alembic (~9 MiB) for a command that migrates nothing.
    head = db.HEAD_REVISION
    state = (
        "at head"
        if current == head
        else f"behind head {head}: run {db.upgrade_command(s.manifest)}"
    )
    out.print(f"manifest {db.redact(s.manifest)}: revision {current or 'none'} ({state})")
    if current != head:
        raise typer.Exit(1)


@db_app.command("rename-node")
def db_rename_node(
    ctx: typer.Context,
    old: Annotated[str, typer.Argument(metavar="OLD", help="The name segments are recorded under")],
    new: Annotated[str, typer.Argument(metavar="NEW", help="The node's name from now on")],
    reason: Annotated[
        str, typer.Option(metavar="TEXT", help="Why; recorded in the audit trail")
    ] = "the node's name changed",
    merge: Annotated[
        bool,
        typer.Option("--merge", help="NEW already has segments: the same machine, merge them"),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Move the segments recorded under node OLD to NEW (the machine's name changed, or an
    earlier version took a name this one refuses). Stop the uploaders still running under OLD
    first: a leased segment refuses the rename, and nothing is moved."""
    from uploader.manifest.repo import Manifest

    s = _ctx(ctx).settings(create=False)
    require_manifest(s)
    path = _sqlite_file(s.manifest)
    if path is not None and not path.exists():  # the embedded default, never created
        raise UsageError(f"no manifest yet ({path}): no segment is recorded under any node")
    who = caller_name()
    m = Manifest.open(s.manifest)
    try:
        moved = m.rename_node(old, new, who=who, why=reason, merge=merge)
    finally:
        m.close()
    if json_output:
        _emit_json({"old": old, "new": new, "renamed": [r.key for r in moved], "who": who})
    else:
        out.print(f"{len(moved)} segments moved from node {old!r} to {new!r}", markup=False)
