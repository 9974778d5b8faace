"""Reading back: ``get`` one object, ``restore`` many, ``rebuild`` a lost manifest; and the
offline ``demo``.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from uploader.cli.app import ctx_store
from uploader.cli.output import JsonOption, _emit_json, _progress, _say, err, out
from uploader.errors import UsageError

if TYPE_CHECKING:
    from uploader import restore as restore_mod
    from uploader.rebuild import RebuiltObject


def demo(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", metavar="DIR", help="Work here instead of a temporary directory"),
    ] = None,
) -> None:
    """The whole story offline: ship, lose the final commit as RocketMQ did, recover, prove."""
    from uploader.demo import run_demo

    ok = run_demo(out, directory)
    raise typer.Exit(0 if ok else 1)


READ_CHUNK = 4 * 1024 * 1024


def get(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="KEY", help="Segment key to read back")],
    dest: Annotated[
        str | None,
        typer.Argument(
            metavar="DEST", help="Where to write it; '-' for stdout (default: its name)"
        ),
    ] = None,
    allow_unverified: Annotated[
        bool, typer.Option(help="Read a segment that is not verified (nothing vouches for it)")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Read one object back, every whole part checked against the manifest."""
    target = dest if dest is not None else key.rsplit("/", 1)[-1]
    with ctx_store(ctx) as store:
        src = store.open_read(key, allow_unverified=allow_unverified)
        with src:
            if target == "-":
                sink = sys.stdout.buffer
                while block := src.read(READ_CHUNK):
                    sink.write(block)
                sink.flush()
            else:
                path = os.path.abspath(target)
                if os.path.isdir(path):
                    raise UsageError(f"{target}: is a directory; name the file to write")
                tmp = os.path.join(
                    os.path.dirname(path), f".{os.path.basename(path)}.uploader-part"
                )
                try:
                    with open(tmp, "wb") as f:
                        while block := src.read(READ_CHUNK):
                            f.write(block)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            unchecked = src.unchecked_bytes
            size = src.size
    if target != "-":
        if json_output:
            _emit_json({"key": key, "path": target, "bytes": size, "unchecked_bytes": unchecked})
        else:
            out.print(
                f"wrote {key} to {target} ({size} bytes, every part checked)"
                if not unchecked
                else f"wrote {key} to {target} ({size} bytes, {unchecked} of them unchecked)"
            )


def restore(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Directory to restore into (DIR/<key>)")
    ],
    prefix: Annotated[
        str, typer.Option(metavar="PREFIX", help="Only keys starting with this")
    ] = "",
    json_output: JsonOption = False,
) -> None:
    """Restore verified segments into DIR: parallel, checked, resumable (present files skipped)."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    from uploader import restore as restore_mod

    lock = threading.Lock()
    with ctx_store(ctx) as store, _progress() as progress:
        task = progress.add_task("restoring", total=None)

        def on_file(f: restore_mod.RestoredFile) -> None:
            with lock:
                progress.advance(task)
                if f.outcome == restore_mod.FAILED:
                    err.print(f"[red]failed[/red] {f.key}: {f.detail}")
                elif not json_output:
                    _say(progress, f"{f.outcome} {f.key} ({f.size} bytes)")

        report = restore_mod.restore(
            store, str(directory), prefix=prefix, concurrency=store.concurrency, on_file=on_file
        )
    if json_output:
        _emit_json(report.as_dict())
    else:
        out.print(
            f"restored {report.count('restored')}, skipped {report.count('skipped')} already "
            f"present, failed {report.count('failed')}"
        )
    raise typer.Exit(0 if report.ok else 1)


def rebuild(
    ctx: typer.Context,
    prefix: Annotated[
        str, typer.Option(metavar="PREFIX", help="Only objects whose key starts with this")
    ] = "",
    json_output: JsonOption = False,
) -> None:
    """Recreate manifest rows from the objects' metadata (the manifest was lost).

    Exit 1 if an object is of unknown origin or disagrees with a row already present.
    """
    lock = threading.Lock()
    with ctx_store(ctx) as store, _progress() as progress:
        task = progress.add_task("rebuilding", total=None)

        def on_object(o: RebuiltObject) -> None:
            with lock:
                progress.advance(task)
                if not json_output and o.outcome != "matched":
                    _say(progress, f"{o.outcome} {o.key}: {o.detail}")

        report = store.rebuild(prefix=prefix, on_object=on_object)
    if json_output:
        _emit_json(report.as_dict())
    else:
        d = report.as_dict()
        out.print(
            f"created {d['created']} verified, {d['unknown']} of unknown origin; "
            f"{d['matched']} already present and matching, {d['differs']} differing"
        )
    raise typer.Exit(0 if report.ok else 1)
