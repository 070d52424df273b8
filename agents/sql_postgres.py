"""A PostgreSQL database for text-to-SQL, read-only by the server as well as by the guard.

PostgreSQL (`postgresql://user@host:5432/db`, needs `pip install 'expertmesh[postgres]'`):
`PostgresDatabase` opens a fresh connection for each call and runs every query in a READ ONLY
transaction with `SET LOCAL statement_timeout` (a query past its deadline is cancelled by the
server: `SqlTimeout`), so a write that got past the guard is still refused by the server. The
schema it shows is what the connecting role may SELECT in its search path: connect as a role
granted only SELECT on the tables the service may read. Values come back as the plain scalars
SQLite gives (numbers, text, bytes; dates and other types as text).
"""

from __future__ import annotations

import datetime
import decimal
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .sql_guard import (
    DatabaseUnreachable,
    DatabaseUnsupported,
    GuardedQuery,
    QueryResult,
    SqlExecutionError,
    SqlTimeout,
    _first_line,
)

if TYPE_CHECKING:
    import psycopg


class PostgresDatabase:
    """A PostgreSQL database at a libpq URL (`postgresql://user:password@host:5432/db`). Each
    call opens its own connection; queries run in a READ ONLY transaction with a server-side
    statement timeout, and the connection is closed (the transaction discarded) afterwards.

    The constructor connects once and reads the schema, so a wrong URL or a down server fails
    here (`DatabaseUnreachable`, naming the URL without its password), not mid-answer."""

    dialect = "postgres"

    catalog_timeout_s = 5.0
    """Deadline for the catalog queries behind `schema()` and `ddl()`."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        try:
            import psycopg  # noqa: F401  (optional: the `postgres` extra)
        except ImportError as e:
            raise DatabaseUnsupported(
                "PostgreSQL needs the psycopg driver: pip install 'expertmesh[postgres]'"
            ) from e
        self.url = url
        self.display_url = _redact_url(url)
        """`url` without its password, for messages and logs."""
        self.connect_timeout_s = connect_timeout_s
        self._password = _url_password(url)
        self._schema: dict[str, tuple[str, ...]] | None = None
        self.schema()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        try:
            # libpq takes whole seconds and treats anything under 2 as 2.
            conn = psycopg.connect(
                self.url, connect_timeout=str(max(2, math.ceil(self.connect_timeout_s)))
            )
        except psycopg.Error as e:
            # `from None`: the driver's exception may carry the conninfo; the message is scrubbed.
            raise DatabaseUnreachable(
                f"cannot connect to PostgreSQL at {self.display_url}: {self._scrub(str(e))}"
            ) from None
        conn.read_only = True  # every transaction on it starts with BEGIN READ ONLY
        return conn

    def _scrub(self, message: str) -> str:
        text = " ".join(line.strip() for line in message.splitlines() if line.strip())
        return text.replace(self._password, "***") if self._password else text

    def _catalog(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        import psycopg

        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(_statement_timeout(self.catalog_timeout_s))
                cur.execute(sql, params)
                return cur.fetchall()
        except psycopg.Error as e:
            raise SqlExecutionError(
                f"reading the catalog of {self.display_url}: {_pg_message(e)}"
            ) from e
        finally:
            conn.close()  # closing discards the (read-only) transaction

    def schema(self) -> Mapping[str, tuple[str, ...]]:
        if self._schema is None:
            schema: dict[str, list[str]] = {}
            owner: dict[str, int] = {}  # name -> the relation it resolves to
            for oid, table, column in self._catalog(_PG_SCHEMA_SQL):
                # A name in two schemas resolves to the one earlier in search_path.
                if owner.setdefault(table, oid) == oid:
                    schema.setdefault(table, []).append(column)
            self._schema = {t: tuple(schema[t]) for t in sorted(schema)}
        return self._schema

    def ddl(self, tables: Sequence[str]) -> str:
        visible = self.schema()
        wanted = [t for t in tables if t in visible]
        if not wanted:
            return ""
        rows = self._catalog(_PG_COLUMNS_SQL, (wanted,))
        constraints = self._catalog(_PG_CONSTRAINTS_SQL, (wanted,))
        out = []
        for table in wanted:
            columns = [r[1:] for r in rows if r[0] == table]
            cons = [r[1:] for r in constraints if r[0] == table]
            out.append(_create_statement(table, columns, cons))
        return "\n".join(out)

    def execute(self, query: GuardedQuery, timeout_s: float) -> QueryResult:
        import psycopg

        conn = self._connect()
        started = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute(_statement_timeout(timeout_s))
                # Prepared: the extended protocol runs exactly one statement, where the simple
                # one would run "SET TRANSACTION READ WRITE; INSERT ..." in full.
                cur.execute(query.executed_sql, prepare=True)
                rows = cur.fetchmany(query.row_limit + 1)
                columns = tuple(d.name for d in cur.description or ())
        except psycopg.errors.QueryCanceled as e:
            raise SqlTimeout(f"the query ran past its {timeout_s:g} s limit") from e
        except psycopg.Error as e:
            raise SqlExecutionError(_pg_message(e)) from e
        finally:
            conn.close()  # closing discards the (read-only) transaction
        truncated = len(rows) > query.row_limit
        return QueryResult(
            columns,
            tuple(tuple(_plain(v) for v in r) for r in rows[: query.row_limit]),
            truncated,
            time.monotonic() - started,
        )


# Tables, views and materialized views of the schemas in search_path (system schemas excluded),
# with the columns the connecting role may SELECT, first schema in search_path first.
_PG_SCHEMA_SQL = """
SELECT c.oid::int8, c.relname, a.attname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname = ANY (pg_catalog.current_schemas(false))
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND pg_catalog.has_column_privilege(c.oid, a.attnum, 'SELECT')
ORDER BY pg_catalog.array_position(pg_catalog.current_schemas(false), n.nspname::text),
         c.relname, a.attnum
"""

# The relation each name resolves to through search_path, as `to_regclass` resolves it.
_PG_RELATION = """
FROM unnest(%s::text[]) AS wanted(name)
JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(pg_catalog.quote_ident(wanted.name))
"""

_PG_COLUMNS_SQL = f"""
SELECT wanted.name, c.relkind, pg_catalog.quote_ident(a.attname),
       pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull
{_PG_RELATION}
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE pg_catalog.has_column_privilege(c.oid, a.attnum, 'SELECT')
ORDER BY a.attnum
"""

# Primary and foreign keys whose columns the role may all read: (kind, columns, definition).
_PG_CONSTRAINTS_SQL = f"""
SELECT wanted.name, k.contype,
       ARRAY(SELECT pg_catalog.quote_ident(a.attname) FROM unnest(k.conkey) AS key(attnum)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = key.attnum),
       pg_catalog.pg_get_constraintdef(k.oid)
{_PG_RELATION}
JOIN pg_catalog.pg_constraint k ON k.conrelid = c.oid AND k.contype IN ('p', 'f')
WHERE NOT EXISTS (SELECT FROM unnest(k.conkey) AS key(attnum)
                  WHERE NOT pg_catalog.has_column_privilege(c.oid, key.attnum, 'SELECT'))
ORDER BY k.contype DESC, k.conname
"""


def _create_statement(
    table: str,
    columns: Sequence[tuple[Any, ...]],
    constraints: Sequence[tuple[Any, ...]],
) -> str:
    """`CREATE TABLE` (or `CREATE VIEW`) from catalog rows: columns are (relkind, name, type,
    not_null), constraints (contype, column names, pg_get_constraintdef). A one-column key
    is written on its column, as hand-written DDL would; others as table constraints."""
    inline: dict[str, list[str]] = {}
    trailing: list[str] = []
    for kind, keys, definition in constraints:
        if len(keys) == 1 and kind == "p":
            inline.setdefault(keys[0], []).append("PRIMARY KEY")
        elif len(keys) == 1 and kind == "f" and " REFERENCES " in definition:
            inline.setdefault(keys[0], []).append(
                "REFERENCES " + definition.split(" REFERENCES ", 1)[1]
            )
        else:
            trailing.append(definition)
    lines = []
    for _, name, type_, not_null in columns:
        extra = inline.get(name, [])
        parts = [name, type_]
        if not_null and "PRIMARY KEY" not in extra:
            parts.append("NOT NULL")
        lines.append(" ".join(parts + extra))
    is_view = bool(columns) and columns[0][0] in ("v", "m")
    head = "CREATE VIEW" if is_view else "CREATE TABLE"
    body = ",\n  ".join(lines + trailing)
    return f"{head} {_quote_ident(table)} (\n  {body}\n);"


def _quote_ident(name: str) -> str:
    """PostgreSQL identifier quoting, as `quote_ident` does it."""
    if name.isidentifier() and name == name.lower() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


def _statement_timeout(timeout_s: float) -> str:
    # 0 would mean "no timeout": round up to at least 1 ms.
    return f"SET LOCAL statement_timeout = {max(1, math.ceil(timeout_s * 1000))}"


def _pg_message(error: Exception) -> str:
    """The server's message and hint on one line (what the model gets for its repair)."""
    diag = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return _first_line(str(error))
    hint = getattr(diag, "message_hint", None)
    return f"{primary} (hint: {hint})" if hint else primary


def _plain(value: Any) -> Any:
    """A PostgreSQL value as the plain scalar SQLite would give (JSON-friendly): integral
    numerics as int, other numerics as float, dates and times as ISO text, bytes as bytes,
    arrays as lists, JSON as loaded, anything else (uuid, interval, inet, ...) as text."""
    if value is None or isinstance(value, bool | int | float | str | bytes | dict):
        return value
    if isinstance(value, decimal.Decimal):
        if value.as_tuple().exponent == 0:  # integral as the server wrote it: sum(bigint)
            return int(value)
        return float(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _redact_url(url: str) -> str:
    """`url` with its password (in the user info or a `password=` parameter) removed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        netloc = f"{userinfo.partition(':')[0]}@{hosts}"
    path, q, query = tail.partition("?")
    if q:
        kept = [p for p in query.split("&") if not p.lower().startswith("password=")]
        query = "&".join(kept)
        q = "?" if kept else ""
    return f"{scheme}://{netloc}{slash}{path}{q}{query}"


def _url_password(url: str) -> str:
    """The password in `url` as written (for scrubbing driver messages), or ""."""
    rest = url.partition("://")[2]
    netloc, _, tail = rest.partition("/")
    userinfo, at, _ = netloc.rpartition("@")
    if at and ":" in userinfo:
        return userinfo.partition(":")[2]
    for part in tail.partition("?")[2].split("&"):
        if part.lower().startswith("password="):
            return part.partition("=")[2]
    return ""
