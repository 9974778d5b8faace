"""The typer application: global options and their ``Context``, opening the store, and
``main()``, which turns errors into one line and an exit code.

Exit codes: 0 everything asked for is done (and verified); 1 something failed or stays
unverified; 2 bad usage or bad input (nothing was recorded or sent).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uploader import settings
from uploader.cli.output import err
from uploader.config import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_PART_SIZE,
    StoreConfig,
    fit_name,
    parse_checksum,
)
from uploader.errors import UploaderError, UsageError

if TYPE_CHECKING:
    # Imported when a command opens the store: `uploader --help` loads neither SQLAlchemy nor
    # fsspec, `uploader db` no fsspec.
    from uploader.storage import RetryNotice
    from uploader.store import Store

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
    checksum: str = "auto"

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
            checksum=parse_checksum(self.checksum),
        ).check()

    def open(self, **kwargs: Any) -> Store:
        """Open the store; ``kwargs`` (a command's own options: worker, verify, ...) override."""
        from uploader.storage import RetryingStorage
        from uploader.store import open as open_store

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


def caller_name() -> str:
    """``user@host (pid N)``: who ran a command that the audit trail names (a retry, a rename)."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    # Cut to the manifest's column (a long login or host name): the audit row keeps the pid.
    return fit_name(f"{user}@{socket.gethostname()}", f" (pid {os.getpid()})")


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
    checksum: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="What proves the bytes of new segments: auto (crc32c where the remote keeps "
            "and echoes CRC32C, else md5), md5 or crc32c",
        ),
    ] = "auto",
) -> None:
    try:
        parse_checksum(checksum)  # refused before any command runs, like the numbers' ranges
    except UsageError as exc:
        raise typer.BadParameter(str(exc), param_hint="--checksum") from None
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
        checksum,
    )
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if debug:
        # Only our own loggers: botocore's debug logs print request headers and credentials ids.
        logging.getLogger("uploader").setLevel(logging.DEBUG)


@contextmanager
def ctx_store(ctx: typer.Context, **kwargs: Any) -> Iterator[Store]:
    store = _ctx(ctx).open(**kwargs)
    try:
        yield store
    finally:
        store.close()


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
