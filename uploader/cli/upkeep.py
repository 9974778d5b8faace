"""Looking after what is recorded: ``status``, ``retry`` of failed segments, ``sweep`` of
orphaned multipart uploads.
"""

from __future__ import annotations

import shlex
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from uploader import settings
from uploader.cli.app import _ctx, _sqlite_file, caller_name, ctx_store, require_manifest
from uploader.cli.output import JsonOption, _emit_json, err, out
from uploader.config import DEFAULT_SWEEP_AGE
from uploader.errors import UploaderError, UsageError
from uploader.records import Status


def retry(
    ctx: typer.Context,
    keys: Annotated[
        list[str] | None, typer.Argument(metavar="KEY", help="Failed segments to retry")
    ] = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="Retry every failed segment")
    ] = False,
    reason: Annotated[
        str, typer.Option(metavar="TEXT", help="Why (what was fixed); recorded in the audit trail")
    ] = "the cause was fixed",
    json_output: JsonOption = False,
) -> None:
    """Bring failed segments back after the cause was fixed (file restored, bucket fixed):
    audited (who, when, why), then driven again: every part is checked against what the remote
    holds and every local byte against the recorded checksums. Exit 0 when all are verified."""
    from uploader.states import SegmentState

    if bool(keys) == all_failed:
        raise UsageError("give the keys of failed segments, or --all-failed (not both)")
    if not reason.strip():
        raise UsageError("--reason must say what was fixed")
    who = caller_name()
    results: list[dict[str, object]] = []
    bad = 0
    refused = 0  # the highest exit code of a refusal
    with ctx_store(ctx) as store:
        todo = store.manifest.failed_keys() if all_failed else list(keys or [])
        if all_failed and not todo:
            err.print("no failed segments")
        for key in todo:
            entry: dict[str, object] = {"key": key}
            results.append(entry)
            try:
                seg = store.retry(key, who=who, why=reason)
                entry["retried_to"] = seg.state.value
                if seg.state is SegmentState.OPEN:
                    # Never sealed: only its writer (or `uploader ship`) seals it; recovery
                    # sends its pending parts meanwhile.
                    outcome = store.finish(key)
                    entry.update(state=outcome.after, detail=outcome.detail)
                    bad += 1
                    if not json_output:
                        out.print(
                            f"retried {key}: open again ({outcome.detail}); seal it with its "
                            f"writer, or `uploader ship {shlex.quote(seg.path)}`"
                        )
                    continue
                outcome = store.finish(key)
                entry.update(state=outcome.after, detail=outcome.detail)
                ok = outcome.after == SegmentState.VERIFIED.value and not outcome.lost
                bad += not ok
                if not json_output:
                    verb = "verified" if ok else f"still {outcome.after}"
                    out.print(f"retried {key}: {verb} ({outcome.detail})", markup=False)
            except UploaderError as exc:
                bad += 1
                refused = max(refused, exc.exit_code)
                entry.update(error=str(exc))
                if not json_output:
                    err.print(f"retry of {key} refused: {exc}", markup=False)
    if json_output:
        _emit_json({"retried": results, "not_verified": bad, "who": who, "reason": reason})
    # An unknown key or one that is not failed is bad input (2); anything else unfinished, 1.
    raise typer.Exit(refused if refused == 2 else (1 if bad else 0))


def _status_dict(status: Status) -> dict[str, object]:
    return {
        "segments": status.segments,
        "commits": status.commits,
        "commit_bytes": status.commit_bytes,
        "unverified_bytes": status.unverified_bytes,
        "oldest_unverified_age": status.oldest_unverified_age,
        "oldest_sealed_age": status.oldest_sealed_age,
        "failed": [{"key": k, "reason": r} for k, r in status.failed],
        "stalled": [{"key": k, "why": w} for k, w in status.stalled],
        "errors": [{"key": k, "last_error": e} for k, e in status.errors],
        "unknown": [{"key": k, "reason": r} for k, r in status.unknown],
        "all_verified": status.all_verified,
    }


def print_status(status: Status, console: Console = out) -> None:
    table = Table(title="manifest")
    table.add_column("state")
    table.add_column("segments", justify="right")
    table.add_column("commits", justify="right")
    table.add_column("commit bytes", justify="right")
    for state in ("open", "sealed", "uploaded", "verified", "failed", "unknown", "pending"):
        table.add_row(
            state,
            str(status.segments.get(state, "")),
            str(status.commits.get(state, "")),
            str(status.commit_bytes.get(state, "")),
        )
    console.print(table)
    age, sealed = status.oldest_unverified_age, status.oldest_sealed_age
    console.print(
        f"unverified bytes: {status.unverified_bytes}; oldest unverified: "
        f"{'none' if age is None else f'{age:.0f} s'}; oldest sealed and not verified: "
        f"{'none' if sealed is None else f'{sealed:.0f} s since its seal'}"
    )
    for key, reason in status.failed:
        console.print(f"failed {key}: {reason}")
    for key, why in status.stalled:
        console.print(f"stalled: {why} (segment {key})")
    for key, error in status.errors:
        console.print(f"unfinished {key}: last error: {error}")
    for key, reason in status.unknown:
        console.print(f"unknown origin {key}: {reason}")


def status(
    ctx: typer.Context,
    json_output: JsonOption = False,
) -> None:
    """Counts per state, unverified bytes, oldest unverified age (exit 1 if anything failed or is
    stalled: an open segment of this node whose local file vanished or shrank, or an object of
    unknown origin was found by a rebuild)."""
    import dataclasses

    from uploader.manifest import db
    from uploader.manifest.repo import Manifest, default_node
    from uploader.stalled import find_stalled

    s = _ctx(ctx).settings(create=False)  # status reads: it creates nothing
    if "://" not in s.remote:
        raise UsageError(
            f"remote {s.remote!r} has no scheme; use e.g. s3://bucket/prefix or file:///path"
        )
    require_manifest(s)
    names = {"manifest": db.redact(s.manifest), "remote": settings.redact_url(s.remote)}
    path = _sqlite_file(s.manifest)
    if path is not None and not path.exists():  # the embedded default, not created yet
        st = Status()
        note = "no manifest yet (nothing shipped with it); `uploader ship` creates it"
    else:
        note = ""
        m = Manifest.open(s.manifest)
        try:
            st = m.status()
            st = dataclasses.replace(st, stalled=find_stalled(m, default_node()))
        finally:
            m.close()
    if json_output:
        _emit_json({**names, **_status_dict(st)})
    else:
        out.print(f"manifest {names['manifest']}; remote {names['remote']}", markup=False)
        if note:
            out.print(note)
        else:
            print_status(st)
            if st.failed:
                out.print(
                    "once the cause is fixed: `uploader retry KEY...` (or `uploader retry "
                    "--all-failed --reason TEXT`)"
                )
    if st.failed or st.stalled or st.format_problems or st.unknown:
        raise typer.Exit(1)


def sweep(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option(help="Only say what would be aborted")] = False,
    older_than: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0.0, help="Leave orphans younger than this many seconds alone"
        ),
    ] = DEFAULT_SWEEP_AGE,
    json_output: JsonOption = False,
) -> None:
    """Abort multipart uploads under the remote root that no unfinished segment references."""
    with ctx_store(ctx) as store:
        report = store.sweep(dry_run=dry_run, older_than=older_than)
    if json_output:
        _emit_json(report.as_dict())
        return
    verb = "would abort" if dry_run else "aborted"
    for key, upload_id in report.aborted:
        out.print(f"{verb} {key} (upload {upload_id})")
    out.print(
        f"{verb} {len(report.aborted)} orphaned upload(s); kept {report.kept_live} live, "
        f"{report.kept_young} younger than {older_than:g} s"
    )
    if report.tmp_removed:
        gone = "would remove" if dry_run else "removed"
        out.print(
            f"{gone} {len(report.tmp_removed)} leftover(s) of the staging area (temporary "
            "files; upload directories without metadata, as uploads/<id>)"
        )
