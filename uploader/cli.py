"""The ``uploader`` command line.

Exit codes: 0 everything asked for is done (and verified); 1 something failed or stays
unverified; 2 bad usage or bad input (nothing was recorded or sent). Errors are one line naming
what and what to do; ``--debug`` adds the traceback. Storage options are never printed.
"""

from __future__ import annotations

import os
import signal
import sys

#: Signals that arrived while the command was still starting (before its own handler).
_EARLY_SIGNALS: list[int] = []


def _early_handler(signum: int, _frame: object) -> None:
    """Installed before the slow imports (typer, SQLAlchemy, fsspec): a SIGTERM is remembered and
    honoured by the command's own handler (``recover --loop``, ``watch`` stop cleanly); a SIGINT
    before any work interrupts at once, as usual (nothing was recorded yet)."""
    _EARLY_SIGNALS.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt


def install_early_handlers() -> None:
    """Called by ``python -m uploader.cli`` and the ``uploader`` script before anything slow."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(signum, _early_handler)
        except ValueError:  # not the main thread: the caller owns signals
            return


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "uploader":
    install_early_handlers()

import json
import logging
import shlex
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from uploader import restore as restore_mod
from uploader import settings
from uploader import verify as verify_mod
from uploader.config import DEFAULT_LEASE_SECONDS, DEFAULT_PART_SIZE, StoreConfig
from uploader.errors import UploaderError, UsageError
from uploader.rebuild import RebuiltObject
from uploader.records import Status
from uploader.recovery import DEFAULT_SWEEP_AGE, RecoveryReport
from uploader.states import UNFINISHED_SEGMENT_STATES
from uploader.storage import RetryingStorage, RetryNotice
from uploader.store import Store
from uploader.store import open as open_store

UNFINISHED = {s.value for s in UNFINISHED_SEGMENT_STATES}

log = logging.getLogger("uploader")

_argument_type = typer.core.TyperArgument.display_type_rich


def _argument_metavar_only(self: typer.core.TyperArgument, ctx: Any) -> str | None:
    """An argument with a metavar (FILE, DIR, KEY) is shown by it alone: typer would add its
    Python type (``FILE <list[Path]>``), which says nothing to an operator."""
    return None if self.metavar is not None else _argument_type(self, ctx)


setattr(typer.core.TyperArgument, "display_type_rich", _argument_metavar_only)  # noqa: B010

app = typer.Typer(
    name="uploader",
    help="Ship append-only segment files to object storage without ever losing the tail.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(help="The manifest's schema (Alembic underneath).", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Context:
    manifest: str | None
    remote: str | None
    storage_options: str | None
    home: str | None
    part_size: int
    concurrency: int
    debug: bool
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    min_part_size: int | None = None

    def settings(self, *, create: bool = True) -> settings.Settings:
        from uploader.manifest import db

        def resolve(create: bool) -> settings.Settings:
            return settings.resolve(
                manifest=self.manifest,
                remote=self.remote,
                storage_options=self.storage_options,
                home=self.home,
                create=create,
            )

        s = resolve(False)
        db.parse_url(s.manifest)  # a typo'd URL is refused before anything is created
        return resolve(True) if create else s

    def config(self) -> StoreConfig:
        """The store settings the global options give (the library's one configuration)."""
        return StoreConfig(
            part_size=self.part_size,
            concurrency=self.concurrency,
            lease_seconds=self.lease_seconds,
            min_part_size=self.min_part_size,
        ).check()

    def open(self, **kwargs: Any) -> Store:
        """Open the store; ``kwargs`` (a command's own options: worker, verify, ...) override."""
        config = self.config()  # bad values refused before anything is created
        require_manifest(self.settings(create=False))  # before creating anything
        s = self.settings()
        store = open_store(
            s.manifest, s.remote, storage_options=s.storage_options, config=config, **kwargs
        )
        if isinstance(store.storage, RetryingStorage):
            # An endpoint that does not answer is never silent: one line per retry.
            store.storage.on_retry = _print_retry
        return store


def _print_retry(notice: RetryNotice) -> None:
    err.print(str(notice), markup=False)


def _sqlite_file(url: str) -> Path | None:
    """The file of an SQLite manifest URL (None: not SQLite, or in memory)."""
    from uploader.manifest import db

    parsed = db.parse_url(url)
    if not db.is_embedded(parsed) or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def is_embedded_default(s: settings.Settings) -> bool:
    return s.manifest == settings.default_manifest(s.home)


def require_manifest(s: settings.Settings) -> None:
    """A typo must not create a new, empty manifest: only the embedded default file is created
    on demand; any other SQLite file must exist (``uploader db upgrade`` creates it)."""
    from uploader.manifest import db

    path = _sqlite_file(s.manifest)
    if path is None or path.exists() or is_embedded_default(s):
        return
    raise UsageError(
        f"manifest {db.redact(s.manifest)}: no such SQLite file ({path}); check the path, or "
        f"create it with {db.upgrade_command(s.manifest)}"
    )


def _ctx(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    assert isinstance(obj, Context)
    return obj


@app.callback()
def main_options(
    ctx: typer.Context,
    manifest: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Manifest SQLAlchemy URL [env UPLOADER_MANIFEST; default: embedded SQLite]",
        ),
    ] = None,
    remote: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Remote root fsspec URL [env UPLOADER_REMOTE; default: local directory]",
        ),
    ] = None,
    storage_options: Annotated[
        str | None,
        typer.Option(
            "--storage-options",
            metavar="JSON",
            help="JSON object for fsspec [env UPLOADER_STORAGE_OPTIONS]; never printed",
        ),
    ] = None,
    home: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="Data directory of the embedded defaults [env UPLOADER_HOME; ./.uploader]",
        ),
    ] = None,
    part_size: Annotated[
        int, typer.Option(metavar="BYTES", help="Part size in bytes")
    ] = DEFAULT_PART_SIZE,
    concurrency: Annotated[
        int, typer.Option(metavar="N", min=1, help="Parts in flight at once")
    ] = 4,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and debug logs")] = False,
    lease_seconds: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            min=1.0,
            help="Lease length: how long a dead process's segments wait before another takes them",
        ),
    ] = DEFAULT_LEASE_SECONDS,
    min_part_size: Annotated[
        int | None,
        typer.Option(
            metavar="BYTES",
            help="Smallest part the remote accepts (S3: 5 MiB; lower only for test servers)",
        ),
    ] = None,
) -> None:
    ctx.obj = Context(
        manifest,
        remote,
        storage_options,
        home,
        part_size,
        concurrency,
        debug,
        lease_seconds,
        min_part_size,
    )
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if debug:
        # Only our own loggers: botocore's debug logs print request headers and credentials ids.
        logging.getLogger("uploader").setLevel(logging.DEBUG)


# --- db -------------------------------------------------------------------------------------------


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
    head = db.head_revision()
    state = (
        "at head"
        if current == head
        else f"behind head {head}: run {db.upgrade_command(s.manifest)}"
    )
    out.print(f"manifest {db.redact(s.manifest)}: revision {current or 'none'} ({state})")
    if current != head:
        raise typer.Exit(1)


# --- progress and signals ---------------------------------------------------------------------------


def _progress(*, transfer: bool = False) -> Progress:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    columns = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if transfer else [MofNCompleteColumn()]
    return Progress(*columns, console=err, transient=True, disable=not err.is_terminal)


def _say(progress: Progress, text: str) -> None:
    """A line of output while a bar may be live: above the bar (through its console) when the
    bar and stdout share a terminal, where a plain stdout write would be glued onto the bar;
    on stdout otherwise."""
    if progress.live.is_started and not progress.disable and out.is_terminal:
        progress.console.print(text, markup=False)
    else:
        out.print(text, markup=False)


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGINT: long commands finish the work in hand, then stop."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        # A plain write, not rich: the handler runs between any two bytecodes of the main thread,
        # possibly in the middle of rich importing the module its print would need (seen as
        # "cannot import name 'EMOJI' from partially initialized module").
        name = signal.Signals(signum).name
        os.write(2, f"{name}: finishing the work in hand, then stopping\n".encode())
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    if _EARLY_SIGNALS:  # arrived while the command was starting
        handler(_EARLY_SIGNALS[-1], None)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _metrics(store: Store, port: int | None) -> tuple[Any, Any]:
    if port is None:
        return None, None
    from uploader.metrics import Metrics, serve

    metrics = Metrics(store)
    server = serve(metrics, port)
    err.print(f"metrics on http://127.0.0.1:{server.server_port}/metrics")
    return metrics, server


def _emit_json(data: object) -> None:
    out.print_json(json.dumps(data, default=str))


# --- ship -----------------------------------------------------------------------------------------


@app.command()
def ship(
    ctx: typer.Context,
    paths: Annotated[
        list[Path], typer.Argument(metavar="FILE", help="Segment files to commit and seal")
    ],
    key_prefix: Annotated[
        str, typer.Option(metavar="PREFIX", help="Prefix of the keys (key = prefix + file name)")
    ] = "",
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Drive each file to verified (re-runnable): new files are shipped, sealed but unfinished
    ones resumed, verified ones reported and skipped; exit 0 when every one is verified.

    Ctrl-C stops taking new work and lets the parts in flight finish (exit 130); a second
    Ctrl-C exits at once. What is left stays recorded for `uploader recover`."""
    for path in paths:
        if path.is_dir():
            raise UsageError(
                f"{path}: is a directory; `uploader ship` takes segment files (e.g. "
                f"{shlex.quote(str(path))}/*), `uploader watch {shlex.quote(str(path))}` tails "
                "a directory"
            )
        if not path.is_file():
            raise UsageError(f"{path}: no such file to ship")
    signals = _ShipSignals()
    with signals.installed():
        _ship(ctx, paths, key_prefix, json_output, signals)


class _ShipSignals:
    """SIGINT/SIGTERM during ``ship``: the first stops taking new work (the main loop sees
    ``count``), the second exits at once (every manifest write is one transaction, so what is
    recorded is consistent; what is pending stays pending)."""

    def __init__(self) -> None:
        self.count = len(_EARLY_SIGNALS)
        #: Called by the first signal before it says so (``Store.stop_sending``: lock-free).
        self.on_first: Callable[[], None] | None = None

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self.on_first is not None:
            self.on_first()
        if self.count >= 2:
            os.write(
                2,
                b"interrupted again: exiting now; the manifest records what was done, "
                b"`uploader recover` finishes what is pending\n",
            )
            os._exit(130)
        os.write(
            2,
            b"interrupt: no new work is started; parts in flight finish and are recorded "
            b"(interrupt again to exit at once)\n",
        )

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@dataclass
class _Shipped:
    key: str
    path: Path
    verified: bool = False
    bytes: int | None = None
    error: str | None = None
    note: str = ""  # how it got there: shipped, resumed, already verified
    state: str | None = None  # where it stands when not verified

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"key": self.key, "verified": self.verified}
        if self.verified:
            d["bytes"] = self.bytes
        else:
            d["error"] = self.error
            d["state"] = self.state
        d["note"] = self.note
        return d


def _ship(
    ctx: typer.Context,
    paths: list[Path],
    key_prefix: str,
    json_output: bool,
    signals: _ShipSignals,
) -> None:
    from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor
    from concurrent.futures import wait as wait_futures

    from uploader.errors import WorkInterruptedError
    from uploader.recovery import SegmentOutcome
    from uploader.states import SegmentState

    entries = [_Shipped(key_prefix + p.name, p) for p in paths]
    started: dict[Future[Any], _Shipped] = {}
    interrupted = False
    with (
        ctx_store(ctx) as store,
        ThreadPoolExecutor(max(1, store.concurrency), thread_name_prefix="uploader-ship") as ex,
        _progress(transfer=True) as progress,
    ):
        s = _ctx(ctx).settings()
        err.print(
            f"shipping {len(paths)} file(s) to {settings.redact_url(s.remote)} "
            f"(manifest {store.manifest.url})",
            markup=False,
        )
        signals.on_first = store.stop_sending
        if signals.count:
            store.stop_sending()
        task = progress.add_task("shipping", total=sum(p.stat().st_size for p in paths))
        # Bytes advance as the remote acknowledges parts (or they are found there already);
        # a verified file tops its own up to its size (parts an earlier run sent).
        moved: dict[str, int] = {}
        moved_lock = threading.Lock()

        def on_bytes(key: str, nbytes: int) -> None:
            with moved_lock:
                moved[key] = moved.get(key, 0) + nbytes
            progress.advance(task, nbytes)

        def done(e: _Shipped) -> None:  # a file verified: its bar topped up, a line said
            with moved_lock:
                rest = max(0, (e.bytes or 0) - moved.get(e.key, 0))
                moved[e.key] = moved.get(e.key, 0) + rest
            progress.advance(task, rest)
            if not json_output:
                _say(progress, f"verified {e.key} ({e.bytes} bytes, {e.note})")

        store.on_bytes = on_bytes
        for e in entries:
            if signals.count:
                break
            try:
                _ship_start(store, ex, e, started)
            except UploaderError as exc:
                e.error = str(exc)
                _ship_failed(store, e, json_output)
            else:
                if e.verified:  # already verified: skipped
                    done(e)
        pending = set(started)
        while pending:
            if signals.count and not interrupted:
                interrupted = True
                store.interrupt()
                for f in pending:
                    f.cancel()
            finished, pending = wait_futures(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in finished:
                e = started[fut]
                try:
                    res = fut.result()
                except CancelledError:
                    e.error, e.state = "interrupted before it started", "not started"
                    continue
                except WorkInterruptedError as exc:
                    e.error = f"{exc}; parts in flight were recorded"
                except UploaderError as exc:
                    e.error = str(exc)
                else:
                    if isinstance(res, SegmentOutcome):
                        if res.after == SegmentState.VERIFIED.value and not res.lost:
                            e.verified = True
                        else:
                            e.error = f"{res.after}: {res.detail}"
                    else:
                        e.verified, e.bytes = res.verified, res.committed
                if e.verified:
                    rec = store.manifest.segment(e.key)
                    e.bytes = rec.size if rec is not None else e.bytes
                    done(e)
                else:
                    _ship_failed(store, e, json_output)
        if signals.count:
            interrupted = True
        for e in entries:
            if not e.verified and e.state is None:
                rec = store.manifest.segment(e.key)
                e.state = rec.state.value if rec is not None else "not started"
                if e.error is None:
                    e.error = "interrupted before it started"
    failed = [e for e in entries if not e.verified]
    if json_output:
        _emit_json(
            {
                "segments": [e.as_dict() for e in entries],
                "failed": len(failed),
                "interrupted": interrupted,
            }
        )
    if interrupted:
        _print_interrupted(entries)
        raise typer.Exit(130)
    if failed and not json_output:
        err.print(f"{len(failed)} segment(s) not verified: see above")
    raise typer.Exit(1 if failed else 0)


def _ship_failed(store: Store, e: _Shipped, json_output: bool) -> None:
    """Where a file that is not verified stands, and what finishes it."""
    if e.state is None:
        rec = store.manifest.segment(e.key)
        e.state = rec.state.value if rec is not None else "not started"
    if not json_output:
        err.print(f"not verified {e.key} ({e.state}): {e.error}", markup=False)


def _print_interrupted(entries: list[_Shipped]) -> None:
    verified = sum(e.verified for e in entries)
    sealed = [e for e in entries if e.state in ("sealed", "uploaded")]
    other = [e for e in entries if not e.verified and e.state not in ("sealed", "uploaded")]
    line = f"interrupted: {verified} verified, {len(sealed)} unfinished; `uploader recover` finishes them"
    if other:
        line += (
            f"; {len(other)} not sealed yet (open, not started or failed): run the same "
            "`uploader ship` again"
        )
    err.print(line, markup=False)


def _ship_start(store: Store, ex: Any, e: _Shipped, started: dict[Any, _Shipped]) -> None:
    """Start driving one file to verified, from wherever the manifest says it stands."""
    from uploader.errors import KeyConflictError, SegmentFailedError
    from uploader.states import SegmentState

    rec = store.manifest.segment(e.key)
    path = str(e.path.resolve())
    if rec is not None and rec.path != path:
        raise KeyConflictError(
            f"segment key {e.key!r} is already registered for {rec.path!r}, not {path!r}; "
            "choose another --key-prefix"
        )
    if rec is None or rec.state is SegmentState.OPEN:
        e.note = "shipped" if rec is None else "sealed (it was open)"
        started[store.segment(e.key, e.path).seal()] = e
    elif rec.state is SegmentState.VERIFIED:
        size = e.path.stat().st_size
        if size != rec.size:
            e.state = rec.state.value
            raise UsageError(
                f"segment {e.key!r} was verified at {rec.size} bytes but {e.path} now has "
                f"{size}: a sealed segment takes no more bytes; ship them as a new segment"
            )
        e.verified, e.bytes, e.note = True, rec.size, "already verified; skipped"
    elif rec.state is SegmentState.FAILED:
        e.state = rec.state.value
        raise SegmentFailedError(
            f"segment {e.key!r} failed: {rec.reason}; fix the cause, then run "
            f"`uploader retry {shlex.quote(e.key)}`"
        )
    else:  # sealed or uploaded: unfinished; the driver finishes it
        e.note = f"resumed ({rec.state.value})"
        started[ex.submit(store.finish, e.key)] = e


@contextmanager
def ctx_store(ctx: typer.Context, **kwargs: Any) -> Iterator[Store]:
    store = _ctx(ctx).open(**kwargs)
    try:
        yield store
    finally:
        store.close()


# --- watch ----------------------------------------------------------------------------------------


@app.command()
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
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", min=0, max=65535, help="Serve Prometheus metrics (0: any free port)"
        ),
    ] = None,
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


# --- recover --------------------------------------------------------------------------------------


def _recover_pass(store: Store, progress: Progress, stop: threading.Event) -> RecoveryReport:
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
        return store.recover(stop=stop, on_segment=on_segment)
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


@app.command()
def recover(
    ctx: typer.Context,
    loop: Annotated[bool, typer.Option(help="Keep running passes until SIGTERM/SIGINT")] = False,
    interval: Annotated[
        float, typer.Option(metavar="SECONDS", min=0.01, help="Seconds between passes with --loop")
    ] = 10.0,
    worker: Annotated[
        str | None, typer.Option(metavar="NAME", help="Worker name (default host:pid:random)")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", min=0, max=65535, help="Serve Prometheus metrics (0: any free port)"
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
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
                    report = _recover_pass(store, progress, stop)
                on_report(report)
            else:
                with _progress(transfer=True) as progress:  # bytes sent, over every pass
                    task = progress.add_task("recovering", total=None)
                    store.on_bytes = lambda _key, nbytes: progress.advance(task, nbytes)
                    try:
                        report = recover_loop(
                            store.crew, interval=interval, stop=stop, on_report=on_report
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


# --- retry ----------------------------------------------------------------------------------------


def _who() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


@app.command()
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
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Bring failed segments back after the cause was fixed (file restored, bucket fixed):
    audited (who, when, why), then driven again: every part is checked against what the remote
    holds and every local byte against the recorded checksums. Exit 0 when all are verified."""
    from uploader.states import SegmentState

    if bool(keys) == all_failed:
        raise UsageError("give the keys of failed segments, or --all-failed (not both)")
    if not reason.strip():
        raise UsageError("--reason must say what was fixed")
    who = _who()
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


# --- status ---------------------------------------------------------------------------------------


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


@app.command()
def status(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
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


# --- verify ---------------------------------------------------------------------------------------


@app.command()
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
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", min=0, max=65535, help="Serve Prometheus metrics (0: any free port)"
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Check the remote objects of verified segments again (exit 1 on any drift).

    A verified object found missing or different leaves `verified`: uploaded again from its
    intact local file, or `failed` when that is gone too.
    """
    with ctx_store(ctx) as store, _stop_on_signals() as stop:
        metrics, server = _metrics(store, metrics_port)

        def count(check: verify_mod.Check) -> None:
            if metrics is not None:
                metrics.verified_again(check.ok)
                if check.state == "failed":  # remote object lost and local file gone
                    metrics.failed("lost")

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


def _print_verify(report: verify_mod.VerifyReport, json_output: bool) -> None:
    if json_output:
        _emit_json(report.as_dict())
        return
    for c in report.checks:
        line = f"{'ok' if c.ok else 'DRIFT' if c.drift else 'NOT VERIFIED'} {c.key}"
        if c.problem:
            line += f": {c.problem}"
        if c.action:
            line += f"; {c.action}"
        out.print(line)
    out.print(f"checked {len(report.checks)}, {len(report.drifted)} problem(s)")


# --- sweep ----------------------------------------------------------------------------------------


@app.command()
def sweep(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option(help="Only say what would be aborted")] = False,
    older_than: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0.0, help="Leave orphans younger than this many seconds alone"
        ),
    ] = DEFAULT_SWEEP_AGE,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
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


# --- demo -----------------------------------------------------------------------------------------


@app.command()
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


# --- reading back: get, restore, rebuild --------------------------------------------------------

READ_CHUNK = 4 * 1024 * 1024


@app.command()
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
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
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


@app.command()
def restore(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="Directory to restore into (DIR/<key>)")
    ],
    prefix: Annotated[
        str, typer.Option(metavar="PREFIX", help="Only keys starting with this")
    ] = "",
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Restore verified segments into DIR: parallel, checked, resumable (present files skipped)."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
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


@app.command()
def rebuild(
    ctx: typer.Context,
    prefix: Annotated[
        str, typer.Option(metavar="PREFIX", help="Only objects whose key starts with this")
    ] = "",
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
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


# --- entry point ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console script: one-line errors with exit codes, tracebacks only with ``--debug``."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Standalone mode: click prints usage errors and exits 2, typer.Exit gives our codes.
        app(args=args, prog_name="uploader")
    except UploaderError as exc:
        if debug:
            err.print_exception()
        err.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        from uploader.manifest import db

        if db.is_outage(exc):
            # The daemons ride these out; a one-shot command (or a daemon stopping, or starting)
            # met the manifest unavailable: nothing half-done is lost, run it again later.
            err.print(
                f"error: the manifest is unavailable ({db.describe(exc)}); every write is one "
                "transaction, so nothing half-done was recorded: run the command again once it "
                "answers",
                markup=False,
            )
            sys.exit(1)
        err.print(
            f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            markup=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
