"""Alembic environment for the manifest (online only: the manifest is always a live database)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Engine

from uploader.manifest.db import create_manifest_engine
from uploader.manifest.models import METADATA

config = context.config
target_metadata = METADATA


def _engine() -> tuple[Engine, bool]:
    given = config.attributes.get("engine")
    if given is not None:
        return given, False
    url = os.environ.get("UPLOADER_MANIFEST") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no manifest URL: set UPLOADER_MANIFEST or sqlalchemy.url")
    return create_manifest_engine(url), True


def run_migrations_online() -> None:
    engine, owned = _engine()
    try:
        # A write transaction: on SQLite, BEGIN IMMEDIATE (two processes upgrading one new file
        # queue up instead of failing on a lock upgrade).
        with engine.connect().execution_options(uploader_write=True) as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things: batch mode copies the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
    finally:
        if owned:
            engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported for the manifest")
run_migrations_online()
