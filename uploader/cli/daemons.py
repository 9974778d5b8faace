"""The long-running commands: ``watch``, ``recover`` (``--loop``) and ``verify`` (``--loop``:
scrub), each on the library's loop, stopped by SIGTERM/SIGINT after the work in hand, with
optional Prometheus metrics.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress

from uploader.cli.app import ctx_store
from uploader.cli.output import JsonOption, MetricsPortOption, _emit_json, _progress, err, out
from uploader.cli.signals import _stop_on_signals
from uploader.config import DEFAULT_MAX_REUPLOADS, DEFAULT_STUCK_PASSES
from uploader.errors import UsageError
from uploader.recovery_report import RecoveryReport
from uploader.states import UNFINISHED_SEGMENT_STATES

if TYPE_CHECKING:
    # The library is imported by the command that runs (each command's body), not by `--help`.
    from uploader import verify as verify_mod
    from uploader.metrics import Metrics
    from uploader.store import Store

UNFINISHED = {s.value for s in UNFINISHED_SEGMENT_STATES}


def _metrics(store: Store, port: int | None) -> tuple[Any, Any]:
    if port is None:
        return None, None
    from uploader.metrics import Metrics, serve

    metrics = Metrics(store)
    server = serve(metrics, port)
    err.print(f"metrics on http://127.0.0.1:{server.server_port}/metrics")
    return metrics, server


def watch(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Directory of rolling segment files")
    ],
    interval: Annotated[
        float, typer.Option(metavar="SECONDS", min=0.01, help="Seconds between passes")
    ] = 1.0,
    segment_size: Annotated[
        int | None,
        typer.Option(metavar="BYTES", help="Seal a segment once it reaches this many bytes"),
    ] = None,
    pattern: Annotated[
        str, typer.Option(metavar="GLOB", help="Glob of segment file names")
    ] = "[0-9]*",
    key_prefix: Annotated[
        str | None,
        typer.Option(metavar="PREFIX", help="Key prefix (default: the directory's name and '/')"),
    ] = None,
    recover_every: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0.01, help="Seconds between recovery passes for unfinished seals"
        ),
    ] = 30.0,
    metrics_port: MetricsPortOption = None,
    once: Annotated[
        bool, typer.Option(help="One pass, then exit (1 if a commit or seal failed in it)")
    ] = False,
    seal_on_exit: Annotated[
        bool,
        typer.Option(
            help="On SIGTERM/SIGINT, seal every file, the newest (open) one included, and wait "
            "until it is verified before exiting (the writer stopped for good; not with "
            "--format rocketmq)",
        ),
    ] = False,
    segment_format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="How a file's valid end is found: append (the file size), rocketmq (the commit "
            "log's record chain; files preallocated and written in place), whole (only rolled "
            "files, whole)",
        ),
    ] = "append",
) -> None:
    """Tail a directory of rolling segments: commit new bytes, seal finished segments.

    Exits 1 if a file is left that cannot be read further (its format reported a problem), if a
    commit or seal of the --once pass failed, or if a --seal-on-exit seal did not verify."""
    from uploader.formats import get_format
    from uploader.watch import Watcher, check_directory

    fmt = get_format(segment_format)  # before opening anything
    if segment_size is not None and fmt.preallocated:
        raise UsageError(
            f"--segment-size means nothing with --format {fmt.name}: its files are created at "
            "full size and the format says when one is complete"
        )
    if seal_on_exit and fmt.preallocated:
        raise UsageError(
            f"--seal-on-exit cannot be used with --format {fmt.name}: its newest file is "
            "preallocated and the broker continues it when it starts again; it is sealed when "
            "the broker rolls it"
        )
    check_directory(directory, pattern)
    failed_at_exit: list[tuple[str, str]] = []
    with ctx_store(ctx) as store, _stop_on_signals() as stop:
        metrics, server = _metrics(store, metrics_port)

        def on_result(key: str, res: Any) -> None:
            if metrics is not None:
                metrics.uploaded(res.sent_bytes)
            if res.sealed:
                out.print(f"sealed and verified {key} ({res.committed} bytes)")

        def on_error(key: str, what: str, exc: BaseException) -> None:
            if metrics is not None:
                metrics.failed(what)
            err.print(f"{what} of {key} failed, left pending: {exc}")

        def on_problem(key: str, problem: str) -> None:
            if metrics is not None:  # the watcher logs it once; the exit code says it too
                metrics.failed("format")

        watcher = Watcher(
            store,
            directory,
            key_prefix=key_prefix,
            pattern=pattern,
            segment_size=segment_size,
            format=fmt,
            on_result=on_result,
            on_error=on_error,
            on_problem=on_problem,
        )
        err.print(f"watching {watcher.directory} (keys {watcher.key_prefix}*, format {fmt.name})")

        def on_recovery(report: RecoveryReport) -> None:
            if metrics is not None:
                metrics.uploaded(report.bytes_sent)
                metrics.failed("recovery", len(report.failed))

        try:
            if once:
                if not stop.is_set():
                    failed_at_exit = list(watcher.tick().errors)
            else:
                # The library's loop: ticks, a recovery pass every --recover-every seconds, and
                # manifest outages ridden out (logged, backed off, retried).
                watcher.run(
                    interval=interval,
                    stop=stop,
                    recover_every=recover_every,
                    on_recovery=on_recovery,
                )
            if seal_on_exit and stop.is_set():
                err.print("sealing the open files, waiting until they are verified")
                failed_at_exit = list(watcher.seal_open().errors)
        finally:
            if server is not None:
                server.shutdown()
    err.print("stopped")
    # Format problems are listed once, as unresolved; the other failures of the last pass here.
    failures = [(key, why) for key, why in failed_at_exit if key not in watcher.problems]
    for key, why in failures:
        err.print(f"failed: {key}: {why}")
    if watcher.problems:
        for key, problem in sorted(watcher.problems.items()):
            err.print(f"unresolved: {key}: {problem}")
    if failures or watcher.problems:
        raise typer.Exit(1)


def _recover_pass(
    store: Store, progress: Progress, stop: threading.Event, max_reuploads: int, stuck_passes: int
) -> RecoveryReport:
    """One recovery pass under a bar of bytes: the pending bytes to send, advanced as the remote
    acknowledges parts (or they are found there already); segments counted in its label."""
    st = store.status()
    unfinished = sum(n for state, n in st.segments.items() if state in UNFINISHED)
    label = "recovering {} of " + f"{unfinished} segment(s)"
    task = progress.add_task(label.format(0), total=st.commit_bytes.get("pending", 0) or None)
    seen = [0]
    lock = threading.Lock()

    def on_segment(_outcome: object) -> None:  # from the recovery job's threads
        with lock:
            seen[0] += 1
            progress.update(task, description=label.format(seen[0]))

    store.on_bytes = lambda _key, nbytes: progress.advance(task, nbytes)
    try:
        return store.recover(
            stop=stop,
            on_segment=on_segment,
            max_reuploads=max_reuploads,
            stuck_passes=stuck_passes,
        )
    finally:
        store.on_bytes = None


def _print_report(report: RecoveryReport) -> None:
    for o in report.outcomes:
        out.print(f"{o.key}: {o.before} -> {o.after} ({o.detail})")
    out.print(
        f"recovered {report.resumed} segment(s): {len(report.verified)} verified, "
        f"{len(report.failed)} failed, {len(report.unfinished)} unfinished; "
        f"{report.bytes_sent} bytes sent, {report.bytes_reused} reused"
    )


def recover(
    ctx: typer.Context,
    loop: Annotated[bool, typer.Option(help="Keep running passes until SIGTERM/SIGINT")] = False,
    interval: Annotated[
        float, typer.Option(metavar="SECONDS", min=0.01, help="Seconds between passes with --loop")
    ] = 10.0,
    worker: Annotated[
        str | None, typer.Option(metavar="NAME", help="Worker name (default host:pid:random)")
    ] = None,
    max_reuploads: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=0,
            help="Fail a segment whose object vanished or failed verification more than N times",
        ),
    ] = DEFAULT_MAX_REUPLOADS,
    stuck_passes: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=1,
            help="Fail a segment after N passes in a row end on the same error no retry fixes "
            "(a call the remote does not support, a request it refuses)",
        ),
    ] = DEFAULT_STUCK_PASSES,
    metrics_port: MetricsPortOption = None,
    json_output: JsonOption = False,
) -> None:
    """Finish interrupted segments; exit 0 when everything seen is verified.

    With --loop, a manifest outage (a lost connection, a server restart, a locked SQLite file) is
    logged and ridden out: the loop backs off and tries again."""
    from uploader.recovery import recover_loop

    with ctx_store(ctx, worker=worker) as store, _stop_on_signals() as stop:
        metrics, server = _metrics(store, metrics_port)

        def on_report(report: RecoveryReport) -> None:
            if metrics is not None:
                metrics.uploaded(report.bytes_sent)
                metrics.failed("recovery", len(report.failed))
            if json_output:
                _emit_json(report.as_dict())
            elif report.resumed or not loop:
                _print_report(report)

        if loop:  # the daemon's readiness line: its signal handlers are in place
            err.print(
                f"recovering every {interval:g} s as worker {store.worker}; SIGTERM or SIGINT "
                "stops it after the work in hand",
                markup=False,
            )
        try:
            if not loop:
                with _progress(transfer=True) as progress:
                    report = _recover_pass(store, progress, stop, max_reuploads, stuck_passes)
                on_report(report)
            else:
                with _progress(transfer=True) as progress:  # bytes sent, over every pass
                    task = progress.add_task("recovering", total=None)
                    store.on_bytes = lambda _key, nbytes: progress.advance(task, nbytes)
                    try:
                        report = recover_loop(
                            store.crew,
                            interval=interval,
                            stop=stop,
                            on_report=on_report,
                            max_reuploads=max_reuploads,
                            stuck_passes=stuck_passes,
                        )
                    finally:
                        store.on_bytes = None
        finally:
            if server is not None:
                server.shutdown()
        status = store.status()
        leased = store.manifest.leased_unfinished(exclude_owner=store.worker, node=store.node)
    if leased:
        owners = sorted({_owner(o) for _, o, _ in leased})
        until = max(e for _, _, e in leased)
        err.print(
            f"{len(leased)} unfinished, leased by {', '.join(owners)} until "
            f"{until:%H:%M:%S} UTC (another process works on them, or a dead one's lease runs "
            "out then); run `uploader recover` again after that",
            markup=False,
        )
    if not report.ok or status.failed or leased:
        raise typer.Exit(1)


def _owner(worker: str) -> str:
    """``host:pid`` of a worker name ``host:pid:random``."""
    return ":".join(worker.split(":")[:2])


def verify(
    ctx: typer.Context,
    keys: Annotated[
        list[str] | None,
        typer.Argument(metavar="KEY", help="Keys to check (default: all verified)"),
    ] = None,
    deep: Annotated[bool, typer.Option(help="Read the objects back and compare checksums")] = False,
    repair: Annotated[
        bool,
        typer.Option(help="Upload a drifted object again from its intact local file at once"),
    ] = True,
    loop: Annotated[
        bool, typer.Option(help="Scrub: keep checking, the longest unchecked first")
    ] = False,
    interval: Annotated[
        float, typer.Option(metavar="SECONDS", min=0.01, help="Seconds between scrub passes")
    ] = 60.0,
    batch: Annotated[int, typer.Option(metavar="N", min=1, help="Segments per scrub pass")] = 1000,
    rate: Annotated[
        float | None,
        typer.Option(metavar="BYTES/S", help="Bytes per second at most for --deep reads"),
    ] = None,
    metrics_port: MetricsPortOption = None,
    json_output: JsonOption = False,
) -> None:
    """Check the remote objects of verified segments again (exit 1 on any drift).

    A verified object found missing or different leaves `verified`: uploaded again from its
    intact local file, or `failed` when that is gone too.
    """
    from uploader import verify as verify_mod

    with ctx_store(ctx) as store, _stop_on_signals() as stop:
        metrics, server = _metrics(store, metrics_port)

        def count(check: verify_mod.Check) -> None:
            if metrics is not None:
                _count_check(metrics, check)

        try:
            if not loop:
                report = store.verify(keys or None, deep=deep, repair=repair, on_check=count)
                _print_verify(report, json_output)
                bad = not report.ok
            else:
                bad = False

                def on_report(report: verify_mod.VerifyReport) -> None:
                    nonlocal bad
                    if report.checks and (json_output or not report.ok):
                        _print_verify(report, json_output)
                    bad = bad or not report.ok

                # The library's scrub loop (manifest outages ridden out: logged, retried).
                verify_mod.scrub_loop(
                    store.crew,
                    interval=interval,
                    stop=stop,
                    limit=batch,
                    deep=deep,
                    rate=rate,
                    on_check=count,
                    on_report=on_report,
                )
        finally:
            if server is not None:
                server.shutdown()
    if bad:
        raise typer.Exit(1)


def _count_check(metrics: Metrics, check: verify_mod.Check) -> None:
    """A check in the metrics: checked again and drift only if judged (a segment not verified
    yet, or an object not judged, is neither)."""
    if check.ok or check.drift:
        metrics.verified_again(check.ok)
    if check.state == "failed":  # remote object lost and local file gone
        metrics.failed("lost")


def _print_verify(report: verify_mod.VerifyReport, json_output: bool) -> None:
    if json_output:
        _emit_json(report.as_dict())
        return
    for c in report.checks:
        if c.ok or c.drift:
            label = "ok" if c.ok else "DRIFT"
        else:
            label = "NOT JUDGED" if c.not_judged else "NOT VERIFIED"
        line = f"{label} {c.key}"
        if c.problem:
            line += f": {c.problem}"
        if c.action:
            line += f"; {c.action}"
        out.print(line)
    out.print(f"checked {len(report.checks)}, {len(report.drifted)} problem(s)")
