"""Many rows in one ``INSERT``, whatever the database: the group commit's intents and every
transaction's audit rows.

On PostgreSQL the rows go as one array per column, unpacked by ``unnest``: one short statement,
whose text psycopg parses once and caches, and whose arrays it converts in C. The two ways
SQLAlchemy has otherwise both cost the client several times the CPU per row there: a multi-row
``VALUES`` statement (what it sends for an executemany with ``RETURNING``) has thousands of
placeholders, which psycopg parses again on every execution (it caches no statement of more than
50 parameters), and an executemany without ``RETURNING`` goes through psycopg's pipeline one row
at a time. On SQLite the rows are executemany parameters of one statement (sqlite3's
executemany runs in C; with ``RETURNING``, SQLAlchemy sends them as multi-row ``VALUES``, which
SQLite parses cheaply); without ``RETURNING`` they go to sqlite3 as tuples, SQLAlchemy's work
for each row (a parameter dictionary, every value through its type's processor) done once per
column (:func:`_sqlite_executemany`).

The arrays are typed by their columns' types without a length (``VARCHAR[]``, not
``VARCHAR(255)[]``): PostgreSQL's explicit cast to ``varchar(n)`` cuts a longer string short
without a word, where the insert must refuse it, as a plain ``INSERT`` does.

Either way the values every row shares (a transaction's time, the lease clock, which may be an
SQL expression) are the statement's, and the rows are inserted in the order given
(``WITH ORDINALITY ... ORDER BY``): ids, and so the audit trail's order, follow it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    CursorResult,
    String,
    Table,
    bindparam,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine


def insert_many(
    conn: Connection,
    table: Table,
    shared: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    returning: Sequence[Any] = (),
    skip_conflicts_on: str | None = None,
) -> CursorResult[Any]:
    """Insert ``rows`` (each the same columns) into ``table``, every one with ``shared``'s values
    too (Python values or SQL expressions); ``returning`` the given columns of the rows
    inserted. ``skip_conflicts_on``: a row whose value in that (unique) column is taken already
    inserts nothing (``ON CONFLICT DO NOTHING``) and returns nothing. A shared SQL expression may
    not read a table (``ValueError``)."""
    if not rows:
        raise ValueError("insert_many: no rows")
    for column, value in shared.items():
        if isinstance(value, ColumnElement) and select(value).get_final_froms():
            # On PostgreSQL it would join the table it reads: one row inserted per row there.
            raise ValueError(f"insert_many: the shared value of {column!r} reads a table")
    columns = list(rows[0])
    statement: Any  # an Insert, with ON CONFLICT and RETURNING as asked
    if (
        conn.dialect.name == "sqlite"
        and not returning
        and skip_conflicts_on is None
        and not any(isinstance(v, ColumnElement) for v in shared.values())
        and (sql := _sqlite_insert(conn, table, (*shared, *columns))) is not None
    ):
        return _sqlite_executemany(conn, table, sql, shared, columns, rows)
    if conn.dialect.name != "postgresql":
        if skip_conflicts_on is None:
            statement = insert(table).values(**shared)
        else:
            statement = (
                sqlite_insert(table)
                .values(**shared)
                .on_conflict_do_nothing(index_elements=[skip_conflicts_on])
            )
        if returning:
            statement = statement.returning(*returning)
        result: CursorResult[Any] = conn.execute(statement, list(rows))
        return result
    arrays = (
        func.unnest(*(bindparam(f"u_{c}", type_=ARRAY(_unbounded(table, c))) for c in columns))
        .table_valued(*columns, with_ordinality="ord")
        .render_derived()
    )
    source = select(
        *(_value(v, table, k) for k, v in shared.items()), *(arrays.c[c] for c in columns)
    ).order_by(arrays.c.ord)
    statement = pg_insert(table).from_select([*shared, *columns], source)
    if skip_conflicts_on is not None:
        statement = statement.on_conflict_do_nothing(index_elements=[skip_conflicts_on])
    if returning:
        statement = statement.returning(*returning)
    result = conn.execute(statement, {f"u_{c}": [r[c] for r in rows] for c in columns})
    return result


def _sqlite_insert(conn: Connection, table: Table, names: tuple[str, ...]) -> str | None:
    """The ``INSERT`` of these columns for :func:`_sqlite_executemany`, or None where
    SQLAlchemy's own would do more than bind their values (so the rows would be stored
    otherwise): a table outside the default schema, a column whose key is not its name, a type
    with an SQL expression around its bind, a column left out that has a default of its own
    (which SQLAlchemy would fill in). Looked up once per table and columns."""
    key = (table, names)
    if key not in _SQLITE_INSERTS:
        _SQLITE_INSERTS[key] = _plain_insert(conn, table, names)
    return _SQLITE_INSERTS[key]


#: :func:`_sqlite_insert`'s answers, by table and column names.
_SQLITE_INSERTS: dict[tuple[Table, tuple[str, ...]], str | None] = {}


def _plain_insert(conn: Connection, table: Table, names: tuple[str, ...]) -> str | None:
    if table.schema is not None:
        return None
    given = set(names)
    for column in table.columns:
        if column.key not in given:
            if column.default is not None and not column.primary_key:
                return None
            continue
        impl = column.type.dialect_impl(conn.dialect)
        if column.key != column.name or impl._has_bind_expression:
            return None
    preparer = conn.dialect.identifier_preparer
    return (
        f"INSERT INTO {preparer.format_table(table)} "
        f"({', '.join(preparer.quote(n) for n in names)}) VALUES ({', '.join('?' * len(names))})"
    )


def _sqlite_executemany(
    conn: Connection,
    table: Table,
    sql: str,
    shared: Mapping[str, Any],
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
) -> CursorResult[Any]:
    """SQLite without ``RETURNING``: the rows as tuples straight to sqlite3's executemany
    (``sql``: :func:`_sqlite_insert`'s, for the shared names then ``columns``).

    Through SQLAlchemy, an executemany builds a parameter dictionary for every row and passes
    each value, the shared ones too, through its type's bind processor (a datetime becomes
    text): most of the client's work for a transaction's audit rows. Here each column's
    processor is looked up once, a shared value converted once, and a row's own values only
    where their type has a processor."""

    def processor(column: str) -> Any:
        return table.c[column].type.dialect_impl(conn.dialect).bind_processor(conn.dialect)

    head = tuple(v if (p := processor(k)) is None else p(v) for k, v in shared.items())
    procs = [processor(c) for c in columns]
    if not any(procs):
        params = [head + tuple(r[c] for c in columns) for r in rows]
    else:
        params = [
            head
            + tuple(r[c] if p is None else p(r[c]) for c, p in zip(columns, procs, strict=True))
            for r in rows
        ]
    return conn.exec_driver_sql(sql, params)


def _unbounded(table: Table, column: str) -> TypeEngine[Any]:
    """The column's type for an array of its values: a string type without its length."""
    kind = table.c[column].type
    if isinstance(kind, String) and kind.length is not None:
        return String()
    return kind


def _value(value: Any, table: Table, column: str) -> Any:
    """A shared value as a column of the ``SELECT``: an SQL expression as it is, a Python value
    bound with its column's type (so the statement, whatever the values, is compiled once)."""
    if isinstance(value, ColumnElement):
        return value
    return literal(value, table.c[column].type)
