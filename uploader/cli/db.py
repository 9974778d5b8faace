"""``uploader db``: the manifest's schema (create or upgrade it, show its revision)."""

from __future__ import annotations

import typer

from uploader.cli.app import _ctx, require_manifest
from uploader.cli.output import out

db_app = typer.Typer(help="The manifest's schema (Alembic underneath).", no_args_is_help=True)


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
