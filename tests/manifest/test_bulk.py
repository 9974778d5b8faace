"""``insert_many``: many rows in one INSERT, the same on SQLite (executemany) and PostgreSQL
(arrays unpacked by ``unnest``): every value as given, whatever its characters; the rows in the
order given (their ids, and so the audit trail, follow it); shared values, Python or SQL, on
every row; a taken key skipped, the others inserted and returned."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import func, insert, literal, select
from sqlalchemy.exc import DataError

from uploader.manifest.bulk import insert_many
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import EVENTS, SEGMENTS

#: Text an array literal or a query parser could mangle: quotes, braces, commas, backslashes,
#: NULL spelled out, whitespace at the ends, non-ASCII, percent signs and placeholders.
AWKWARD = [
    'a "quoted" word',
    "{braces},{and,commas}",
    "back\\slash \\\\ and \\N",
    "NULL",
    "  spaces at both ends  ",
    "line\nbreak\ttab",
    "ünïcödé ✓ 段",
    "100% %(name)s %s $1 ?",
    "",
    "'single'",
]


def _segment(m: Manifest, key: str) -> int:
    with m._write() as tx:
        row = insert_many(
            tx.conn,
            SEGMENTS,
            {"node": "n", "state": "open", "part_size": 1, "fence": 0, "attempts": 0},
            [
                {
                    "key": key,
                    "path": "/p",
                    "created_at": datetime(2026, 1, 1),
                    "updated_at": datetime(2026, 1, 1),
                }
            ],
            returning=[SEGMENTS.c.id],
        ).one()
    return int(row.id)


@pytest.mark.parametrize("returning", [True, False])
def test_values_and_order_as_given(manifest: Manifest, returning: bool) -> None:
    """With ``RETURNING`` and without it (on SQLite, rows straight to sqlite3's executemany)."""
    sid = _segment(manifest, "bulk/one")
    at = datetime(2026, 11, 28, 12, 0, 0, 123456)
    details: list[str | None] = [*AWKWARD, None, *reversed(AWKWARD)]
    with manifest._write() as tx:
        result = insert_many(
            tx.conn,
            EVENTS,
            {"at": at},
            [
                {
                    "segment_id": sid,
                    "commit_id": None,
                    "from_state": None if i % 3 == 0 else "open",
                    "to_state": f"s{i}",
                    "worker": AWKWARD[i % len(AWKWARD)],
                    "fence": i,
                    "detail": d,
                }
                for i, d in enumerate(details)
            ],
            returning=[EVENTS.c.id] if returning else (),
        )
        ids = [r.id for r in result] if returning else None
    events = manifest.events(sid)
    assert len(events) == len(details)
    if ids is not None:
        assert [e.id for e in events] == sorted(ids)
    # In the order given: the ids follow it.
    assert [e.to_state for e in events] == [f"s{i}" for i in range(len(details))]
    assert [e.detail for e in events] == details
    assert [e.worker for e in events] == [AWKWARD[i % len(AWKWARD)] for i in range(len(details))]
    assert [e.from_state for e in events] == [
        None if i % 3 == 0 else "open" for i in range(len(details))
    ]
    assert [e.fence for e in events] == list(range(len(details)))
    assert {e.at for e in events} == {at}


def test_a_shared_sql_expression_is_on_every_row(manifest: Manifest) -> None:
    with manifest._write() as tx:
        rows = insert_many(
            tx.conn,
            SEGMENTS,
            {
                "node": "n",
                "state": "open",
                "part_size": literal(7) * 3,  # evaluated by the database
                "fence": 0,
                "attempts": 0,
                "created_at": datetime(2026, 1, 1),
                "updated_at": datetime(2026, 1, 2),
            },
            [{"key": f"bulk/expr/{i}", "path": f"/p/{i}"} for i in range(5)],
            returning=[SEGMENTS.c.key, SEGMENTS.c.part_size, SEGMENTS.c.updated_at],
        ).all()
    assert sorted((r.key, r.part_size, r.updated_at) for r in rows) == [
        (f"bulk/expr/{i}", 21, datetime(2026, 1, 2)) for i in range(5)
    ]


def test_taken_keys_are_skipped_the_others_inserted(manifest: Manifest) -> None:
    _segment(manifest, "bulk/taken")
    shared = {
        "node": "n",
        "state": "open",
        "part_size": 1,
        "fence": 0,
        "attempts": 0,
        "created_at": datetime(2026, 1, 1),
        "updated_at": datetime(2026, 1, 1),
    }
    keys = ["bulk/new/1", "bulk/taken", "bulk/new/2"]
    with manifest._write() as tx:
        returned = insert_many(
            tx.conn,
            SEGMENTS,
            shared,
            [{"key": k, "path": f"/p/{i}"} for i, k in enumerate(keys)],
            returning=[SEGMENTS.c.key, SEGMENTS.c.path],
            skip_conflicts_on="key",
        ).all()
    assert sorted((r.key, r.path) for r in returned) == [
        ("bulk/new/1", "/p/0"),
        ("bulk/new/2", "/p/2"),
    ]
    with manifest.engine.connect() as conn:
        taken = conn.execute(select(SEGMENTS.c.path).where(SEGMENTS.c.key == "bulk/taken")).one()
        count = conn.execute(select(func.count()).select_from(SEGMENTS)).scalar()
    assert taken.path == "/p"  # left alone
    assert count == 3


def test_no_rows_is_a_caller_error(manifest: Manifest) -> None:
    with pytest.raises(ValueError, match="no rows"), manifest._write() as tx:
        insert_many(tx.conn, EVENTS, {"at": datetime(2026, 1, 1)}, [])


def test_a_value_too_long_for_its_column_is_refused_not_cut(manifest: Manifest) -> None:
    if not manifest.is_postgres:
        pytest.skip("SQLite keeps strings whole whatever the declared length")
    sid = _segment(manifest, "bulk/long")
    worker = "w" * 300  # events.worker is VARCHAR(255)
    row = {
        "segment_id": sid,
        "commit_id": None,
        "from_state": None,
        "to_state": "open",
        "worker": worker,
        "fence": 0,
        "detail": None,
    }
    with pytest.raises(DataError, match="too long"), manifest._write() as tx:
        insert_many(tx.conn, EVENTS, {"at": datetime(2026, 1, 1)}, [row])
    assert manifest.events(sid) == []  # nothing written, not a shortened copy


def test_a_shared_value_that_reads_a_table_is_refused(manifest: Manifest) -> None:
    _segment(manifest, "bulk/there")
    with pytest.raises(ValueError, match="'part_size' reads a table"), manifest._write() as tx:
        insert_many(
            tx.conn,
            SEGMENTS,
            {"node": "n", "state": "open", "part_size": SEGMENTS.c.part_size + 1},
            [{"key": "bulk/x", "path": "/p", "fence": 0, "attempts": 0}],
        )


def test_rows_are_stored_as_sqlalchemy_stores_them(manifest: Manifest) -> None:
    """Shared and own values of every type (datetimes, integers, NULLs, text), inserted
    without ``RETURNING``, are stored exactly as SQLAlchemy's own ``INSERT`` stores them (on
    SQLite the text of a datetime is what every comparison of leases and times reads)."""
    own = datetime(2026, 3, 4, 5, 6, 7, 890)
    shared = {"node": "n", "state": "open", "part_size": 9, "fence": 0, "attempts": 0}
    rows = [
        {
            "key": f"bulk/store/{how}",
            "path": AWKWARD[2],
            "created_at": own,
            "updated_at": datetime(2026, 1, 1),
            "lease_expires": None,
            "file_inode": 2**40,
        }
        for how in ("ours", "theirs")
    ]
    with manifest._write() as tx:
        insert_many(tx.conn, SEGMENTS, shared, rows[:1])
        tx.conn.execute(insert(SEGMENTS), [{**shared, **rows[1]}])
    cols = ", ".join(c for c in [*shared, *rows[0]] if c != "key")
    with manifest.engine.connect() as conn:
        stored = conn.exec_driver_sql(f"SELECT {cols} FROM segments ORDER BY key").all()
    assert len(stored) == 2 and stored[0] == stored[1]
    assert manifest.segment("bulk/store/ours") is not None


def test_a_table_sqlalchemy_would_fill_in_is_inserted_by_sqlalchemy(manifest: Manifest) -> None:
    """Without ``RETURNING`` on SQLite the rows go straight to sqlite3 only where SQLAlchemy's
    own ``INSERT`` would bind them and nothing more: a column left out with a default of its
    own, or whose key is not its name, keeps SQLAlchemy's way (the default is filled in)."""
    from sqlalchemy import Column, Integer, MetaData, String, Table

    extra = Table(
        "bulk_extra",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("label", String(20), key="label_key"),
        Column("kind", String(20), default="filled"),
    )
    extra.create(manifest.engine)
    try:
        with manifest._write() as tx:
            insert_many(tx.conn, extra, {}, [{"label_key": "a"}, {"label_key": "b"}])
        with manifest.engine.connect() as conn:
            rows = conn.execute(select(extra.c.label_key, extra.c.kind)).all()
        assert sorted(rows) == [("a", "filled"), ("b", "filled")]
    finally:
        extra.drop(manifest.engine)
