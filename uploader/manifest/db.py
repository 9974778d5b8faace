"""Connecting to a manifest and keeping its schema at the code's Alembic head.

* SQLite (the embedded default): WAL journal, a busy timeout, ``synchronous=FULL`` (a ``pending``
  row must survive power loss: intent before action), and ``BEGIN IMMEDIATE`` for every write
  transaction so that a read-then-write (a claim) is exclusive across processes; reads are
  deferred transactions (WAL snapshots: no lock). The file is created or upgraded to head on open.
  The busy timeout is 30 s; ``?timeout=SECONDS`` in the URL sets another.
* PostgreSQL (several processes or hosts): a database behind head raises
  :class:`SchemaBehindError` naming ``uploader db upgrade``; we never migrate a shared server
  database behind an operator's back. Pooled connections are pinged before use (a connection the
  server dropped is replaced, not handed out) and a connect gives up after 10 s (the URL's own
  ``connect_timeout`` wins).

:func:`is_outage` (in :mod:`uploader.manifest.outages`, importable from here) tells a manifest
outage (a lost connection, a server restarting, a busy SQLite file: the daemons back off and
retry) from a configuration error (a wrong URL, role or database: they exit).
"""

from __future__ import annotations

import functools
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
)

from uploader.errors import (
    ManifestUnreachableError,
    SchemaAheadError,
    SchemaBehindError,
    UsageError,
)

# Defined in uploader.manifest.outages; importable from here as they always were.
from uploader.manifest.outages import describe as describe
from uploader.manifest.outages import is_outage as is_outage

if TYPE_CHECKING:
    from alembic.config import Config

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Seconds a PostgreSQL connect may take (a server that does not answer at all, not one that
#: refuses: that fails at once); without it a daemon could hang in a connect for minutes.
PG_CONNECT_TIMEOUT = 10

#: The newest migration. Opening a manifest already at this revision needs no Alembic at all
#: (it costs ~12 MiB and a tenth of a second to import); tests/manifest/test_migrations.py checks
#: that this is the migration scripts' single head, so the two cannot drift.
HEAD_REVISION = "0006"


def redact(url: str | URL) -> str:
    """The URL as text with its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable manifest URL>"


#: The manifest URL forms accepted, as named in every error about a manifest URL.
ACCEPTED_FORMS = (
    "sqlite:////absolute/path.db, sqlite:///relative/path.db, or "
    "postgresql://user[:password]@host[:port]/database (psycopg 3)"
)

#: Driver names (the URL's scheme) of the two databases we support and the drivers we ship.
_DRIVERS = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def _scheme_hint(scheme: str) -> str:
    """`` (did you mean X?)`` for a misspelt scheme (postgress, postgresql+psycopg2, sqlite3)."""
    import difflib

    base = scheme.split("+", 1)[0]
    if base in ("postgresql", "postgres"):
        return " (did you mean postgresql://? the uploader ships the psycopg 3 driver)"
    close = difflib.get_close_matches(base, ["postgresql", "postgres", "sqlite"], n=1, cutoff=0.6)
    if close:
        return f" (did you mean {'postgresql://' if close[0] != 'sqlite' else 'sqlite:///'}?)"
    return ""


def parse_url(url: str | URL) -> URL:
    """The manifest URL, parsed; UsageError (naming the accepted forms, never a password) when it
    is malformed or names a database or driver the uploader does not ship."""
    text = url if isinstance(url, str) else None
    if text is not None and re.match(r"(?i)sqlite(\+\w+)?:(?!//)", text):
        # sqlite:/x or sqlite:x: SQLAlchemy's message would not say that three slashes are needed.
        raise UsageError(
            f"manifest URL {text!r} is not a SQLite URL (it needs three slashes before a relative "
            f"path, four before an absolute one); accepted forms: {ACCEPTED_FORMS}"
        )
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(
            f"manifest URL {url if isinstance(url, URL) else '<given>'!s} is not a SQLAlchemy URL; "
            f"accepted forms: {ACCEPTED_FORMS}"
        ) from None
    driver = _DRIVERS.get(parsed.drivername.lower())
    if driver is None:
        raise UsageError(
            f"manifest {redact(parsed)}: {parsed.drivername}:// is not a manifest database this "
            f"uploader supports{_scheme_hint(parsed.drivername.lower())}; accepted forms: "
            f"{ACCEPTED_FORMS}"
        )
    if driver == "sqlite" and parsed.host:
        # sqlite://relative.db: the file name parsed as a host; SQLAlchemy would refuse it later.
        raise UsageError(
            f"manifest {redact(parsed)}: a SQLite URL has no host ({parsed.host!r}); accepted "
            f"forms: {ACCEPTED_FORMS}"
        )
    if driver != parsed.drivername:
        # psycopg 3 is the driver we ship; SQLAlchemy would default to psycopg2.
        parsed = parsed.set(drivername=driver)
    return parsed


def is_embedded(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _sqlite_busy_timeout_ms(url: URL) -> int:
    """The busy timeout of an SQLite URL: ``?timeout=SECONDS`` (SQLAlchemy's own parameter for
    pysqlite), else :data:`SQLITE_BUSY_TIMEOUT_MS`."""
    raw = url.query.get("timeout")
    if raw is None:
        return SQLITE_BUSY_TIMEOUT_MS
    value = raw[-1] if isinstance(raw, tuple) else raw
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses NaN
        raise UsageError(
            f"manifest {redact(url)}: timeout={value!r} is not a number of seconds; use e.g. "
            "?timeout=30 (how long a write waits for another process's lock)"
        )
    return int(seconds * 1000)


def _sqlite_pragmas(busy_timeout_ms: int, dbapi_conn: Any, _record: Any) -> None:
    # The driver must not open transactions on its own: we issue BEGIN IMMEDIATE ourselves.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = FULL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


#: Execution option that marks a connection's transactions as writes (``BEGIN IMMEDIATE``).
WRITE = "uploader_write"


def _sqlite_begin(conn: Any) -> None:
    # A write transaction takes SQLite's write lock at BEGIN, so that a read-then-write (a claim,
    # a compare-and-set) is exclusive across processes and never fails half-way on a lock
    # upgrade. A read is a plain (deferred) BEGIN: a WAL snapshot that takes no lock and waits
    # for no writer.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


def create_manifest_engine(url: str | URL) -> Engine:
    """An engine for ``url``; raises UsageError for a malformed URL or missing driver."""
    parsed = parse_url(url)
    try:
        if is_embedded(parsed):
            if parsed.database and parsed.database != ":memory:":
                try:
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ManifestUnreachableError(
                        f"manifest {redact(parsed)}: cannot create the directory of the SQLite "
                        f"file ({exc.strerror or exc}); choose a writable path"
                    ) from None
            # No rollback when a connection goes back to the pool: the driver runs in autocommit
            # mode (every transaction is our own BEGIN IMMEDIATE ... COMMIT/ROLLBACK), so a
            # returned connection never holds one open, and the reset would be a wasted call.
            busy_ms = _sqlite_busy_timeout_ms(parsed)
            engine = create_engine(
                parsed,
                connect_args={"timeout": busy_ms / 1000},
                pool_reset_on_return=None,
            )
            event.listen(engine, "connect", functools.partial(_sqlite_pragmas, busy_ms))
            event.listen(engine, "begin", _sqlite_begin)
        else:
            # pool_pre_ping: a pooled connection the server dropped (a restart, an idle timeout,
            # pg_terminate_backend) is replaced at checkout instead of failing the next statement;
            # a connection found dead mid-statement invalidates the whole pool (SQLAlchemy).
            connect_args: dict[str, Any] = {}
            if "connect_timeout" not in parsed.query:
                connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
            engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (NoSuchModuleError, ImportError) as exc:
        raise UsageError(f"manifest {redact(parsed)}: no database driver for it ({exc})") from None
    except ArgumentError as exc:  # a form parse_url let through; SQLAlchemy's words, one line
        raise UsageError(
            f"manifest {redact(parsed)}: {' '.join(str(exc).split())}; accepted forms: "
            f"{ACCEPTED_FORMS}"
        ) from None
    return engine


def migrations_dir() -> str:
    """The Alembic script directory (``migrations/``, installed as ``uploader.migrations``)."""
    return str(resources.files("uploader.migrations"))


def alembic_config(url: str | URL | None = None, engine: Engine | None = None) -> Config:
    from alembic.config import Config

    ini = Path(__file__).resolve().parents[2] / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", migrations_dir())
    if url is not None:
        # ConfigParser interpolation: a literal '%' must be doubled.
        cfg.set_main_option(
            "sqlalchemy.url",
            parse_url(url).render_as_string(hide_password=False).replace("%", "%%"),
        )
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The head of the migration scripts (read from the scripts: imports Alembic)."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(migrations_dir()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations have {len(heads)} heads; expected exactly one")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in the database (Alembic's ``alembic_version``), or None."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:
        raise SchemaAheadError(
            f"manifest {redact(engine.url)} records several schema revisions "
            f"({', '.join(sorted(rows))}); segment-uploader has a single line of migrations"
        )
    return rows[0] if rows else None


def connect_check(engine: Engine) -> None:
    """Raise ManifestUnreachableError (URL without password) if the database does not answer."""
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        orig = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise ManifestUnreachableError(
            f"cannot connect to manifest {redact(engine.url)}: {orig}"
        ) from None


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(engine=engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(engine=engine), revision)


def ensure_schema(engine: Engine, *, auto_upgrade: bool | None = None) -> None:
    """Make sure the schema is at head: upgrade an embedded file, refuse a server behind or ahead."""
    connect_check(engine)
    current = current_revision(engine)
    if current == HEAD_REVISION:
        return  # the common case, without importing Alembic
    from alembic.script import ScriptDirectory

    if auto_upgrade is None:
        auto_upgrade = is_embedded(engine.url)
    head = head_revision()
    if current == head:
        return
    script = ScriptDirectory(migrations_dir())
    if current is not None:
        try:
            script.get_revision(current)
        except Exception:
            raise SchemaAheadError(
                f"manifest {redact(engine.url)} is at schema revision {current}, which this version "
                f"of segment-uploader does not know (its head is {head}); upgrade segment-uploader"
            ) from None
    elif inspect(engine).has_table("segments"):
        raise SchemaBehindError(
            f"manifest {redact(engine.url)} has tables but no schema revision; "
            "it was not created by `uploader db upgrade`"
        )
    if auto_upgrade:
        upgrade(engine)
        return
    raise SchemaBehindError(
        f"manifest {redact(engine.url)} is at schema revision {current or 'none'} but this code "
        f"needs {head}; run {upgrade_command(engine.url)}"
    )


def upgrade_command(url: str | URL) -> str:
    """The command that creates or upgrades the manifest at ``url``, as it runs when pasted
    (``--manifest`` is a global option: it comes before the command). A URL with a password is
    not printed whole: the command then says where to put it."""
    import shlex

    parsed = parse_url(url)
    if parsed.password is not None:
        return (
            f"`uploader --manifest URL db upgrade` (URL: {redact(parsed)}, with its password; "
            "or UPLOADER_MANIFEST=URL)"
        )
    return f"`uploader --manifest {shlex.quote(redact(url))} db upgrade`"


def default_manifest_url() -> str:
    data = os.environ.get("UPLOADER_HOME") or os.path.join(os.getcwd(), ".uploader")
    return f"sqlite:///{os.path.join(data, 'manifest.db')}"
