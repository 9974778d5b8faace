"""``uploader ship``: drive files to verified, in parallel, with a two-step Ctrl-C."""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uploader import settings
from uploader.cli.app import _ctx, ctx_store
from uploader.cli.output import JsonOption, _emit_json, _progress, _say, err
from uploader.cli.signals import _ShipSignals
from uploader.errors import UploaderError, UsageError

if TYPE_CHECKING:
    from uploader.store import Store


def ship(
    ctx: typer.Context,
    paths: Annotated[
        list[Path], typer.Argument(metavar="FILE", help="Segment files to commit and seal")
    ],
    key_prefix: Annotated[
        str, typer.Option(metavar="PREFIX", help="Prefix of the keys (key = prefix + file name)")
    ] = "",
    json_output: JsonOption = False,
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
        # New and open files are sealed together (store.ship_many: a group commit for the small
        # ones); sealed ones are finished, verified ones skipped, failed ones reported.
        grouped: dict[str, _Shipped] = {}
        for e in entries:
            if signals.count:
                break
            try:
                _ship_start(store, ex, e, started, grouped)
            except UploaderError as exc:
                e.error = str(exc)
                _ship_failed(store, e, json_output)
            else:
                if e.verified:  # already verified: skipped
                    done(e)
        if grouped and not signals.count:
            seals = store.ship_many([(e.key, e.path) for e in grouped.values()])
            started.update(zip(seals, grouped.values(), strict=True))
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


def _ship_start(
    store: Store,
    ex: Any,
    e: _Shipped,
    started: dict[Any, _Shipped],
    grouped: dict[str, _Shipped],
) -> None:
    """Start driving one file to verified, from wherever the manifest says it stands (new and
    open files are added to ``grouped``, sealed together by the caller)."""
    from uploader.errors import KeyConflictError, SegmentFailedError
    from uploader.keys import validate_key
    from uploader.states import SegmentState

    rec = store.manifest.segment(e.key)
    path = str(e.path.resolve())
    if rec is not None and rec.path != path:
        raise KeyConflictError(
            f"segment key {e.key!r} is already registered for {rec.path!r}, not {path!r}; "
            "choose another --key-prefix"
        )
    if rec is None or rec.state is SegmentState.OPEN:
        # Refused here, for this file alone, as store.segment would (ship_many refuses the
        # whole list for one bad or repeated key).
        validate_key(e.key)
        store.storage.check_key(e.key)
        other = grouped.get(e.key)
        if other is not None:
            raise KeyConflictError(
                f"segment key {e.key!r} is given for {str(other.path.resolve())!r} and for "
                f"{path!r}; choose another --key-prefix"
            )
        e.note = "shipped" if rec is None else "sealed (it was open)"
        grouped[e.key] = e
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
