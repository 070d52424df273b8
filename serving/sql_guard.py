"""The SQL guard: what a model-written query must pass before it runs, and the read-only runner.

    query = check_sql(sql, known_tables={"plays", "characters"}, allowed_tables=None,
                      row_limit=100)                       # SqlRefused with a reason, or
    result = SQLiteDatabase("shakespeare.sqlite").execute(query, timeout_s=2.0)

`check_sql` parses with `sqlglot` and allows exactly one read-only query (SELECT, UNION,
WITH ... SELECT): no DML, DDL, PRAGMA, ATTACH, transaction control, stacked statements, or
functions that touch files or load code; only tables that exist and that the caller's scope
allows (CTE names are the query's own). The row limit is enforced by wrapping the query in
`SELECT * FROM (...) LIMIT limit + 1` (the extra row says "truncated").

The runner does not trust the guard alone: the SQLite file is opened read-only
(`file:...?mode=ro`), `PRAGMA query_only` is on, an authorizer allows only reads, and a
progress handler interrupts the query at its deadline (a recursive CTE that never ends is
stopped with `SqlTimeout`).

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
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

if TYPE_CHECKING:
    import psycopg


class SqlError(Exception):
    """Base of text-to-SQL errors."""


class SqlRefused(SqlError):
    """The query was refused before it ran; the message is the reason (fed back to the model
    for its one repair attempt)."""


class SqlExecutionError(SqlError):
    """The database refused or failed the query."""


class SqlTimeout(SqlExecutionError):
    """The query ran past its deadline and was interrupted."""


class DatabaseNotFound(SqlError):
    """No database at the configured path."""


class DatabaseUnsupported(SqlError):
    """The connection URL names a database this build cannot open."""


class DatabaseUnreachable(SqlError):
    """The database server could not be reached, or refused the connection."""


# Statement and expression types that write, change the schema or session, or reach outside the
# database. A read-only query contains none of them anywhere (PostgreSQL allows DML in a CTE).
_FORBIDDEN: tuple[type[exp.Expression], ...] = tuple(
    t
    for t in (
        getattr(exp, name, None)
        for name in (
            "Insert",
            "Update",
            "Delete",
            "Merge",
            "Create",
            "Drop",
            "Alter",
            "AlterTable",
            "TruncateTable",
            "Pragma",
            "Attach",
            "Detach",
            "Command",
            "Transaction",
            "Commit",
            "Rollback",
            "Set",
            "Use",
            "Copy",
            "Grant",
            "Into",
            "LoadData",
            "Lock",
        )
    )
    if isinstance(t, type)
)

# Functions that read or write server files, load code, run SQL given as a string (which would
# skip the table scope), reach other servers, write, change settings, signal other sessions, or
# sleep. Refused in every dialect: a name another database lacks costs nothing to refuse.
# fmt: off
_FORBIDDEN_FUNCTIONS = frozenset({
    "load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "sqlite_offset",
    "pg_stat_file", "pg_file_write", "pg_file_rename", "pg_file_unlink",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_promote", "pg_switch_wal", "pg_create_restore_point", "pg_backup_start",
    "pg_backup_stop", "pg_logical_emit_message", "pg_notify", "pg_import_system_collations",
    "pg_log_backend_memory_contexts", "set_config", "nextval", "setval", "ts_stat",
})
# fmt: on
_FORBIDDEN_FUNCTION_PREFIXES = (
    "pg_read_",  # pg_read_file, pg_read_binary_file
    "pg_ls_",  # pg_ls_dir, pg_ls_logdir, pg_ls_waldir, ...
    "pg_sleep",  # pg_sleep, pg_sleep_for, pg_sleep_until
    "lo_",  # large objects: lo_import and lo_export read and write server files
    "dblink",  # dblink, dblink_exec, ...: SQL over another, writable connection
    "pg_advisory",
    "pg_try_advisory",
    "pg_stat_reset",
    "pg_replication_origin",
    "pg_create_",  # replication slots
    "pg_drop_replication",
)
# query_to_xml('SELECT ...'), table_to_xml(...), schema_to_xml(...) and their xmlschema forms
# read whatever the string names.
_FORBIDDEN_FUNCTION_SUFFIXES = ("_to_xml", "_to_xmlschema", "_to_xml_and_xmlschema")


@dataclass(frozen=True)
class GuardedQuery:
    """A query that passed `check_sql`."""

    sql: str
    """The model's query, normalised by sqlglot."""
    executed_sql: str
    """What runs: `sql` wrapped with the row limit."""
    tables: frozenset[str]
    row_limit: int


@dataclass(frozen=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    truncated: bool
    """More rows existed than the row limit let through."""
    elapsed_s: float


def check_sql(
    sql: str,
    known_tables: Sequence[str] | frozenset[str],
    allowed_tables: frozenset[str] | None = None,
    row_limit: int = 100,
    dialect: str = "sqlite",
) -> GuardedQuery:
    """Parse `sql` and return it row-limited, or raise `SqlRefused` naming why. `known_tables`
    are the database's tables; `allowed_tables` (None: all known) is the caller's scope."""
    if row_limit < 1:
        raise ValueError("row_limit must be at least 1")
    text = sql.strip()
    if not text:
        raise SqlRefused("the model returned no SQL")
    try:
        statements = [s for s in sqlglot.parse(text, read=dialect) if s is not None]
    except SqlglotError as e:
        raise SqlRefused(f"the SQL does not parse: {_first_line(str(e))}") from e
    if len(statements) != 1:
        raise SqlRefused(
            f"exactly one statement is allowed; got {len(statements)} (stacked statements)"
        )
    stmt = statements[0]
    for node in stmt.walk():
        if isinstance(node, _FORBIDDEN):
            raise SqlRefused(f"only read-only SELECT queries are allowed; found {node.key.upper()}")
    if not isinstance(stmt, exp.Query):
        raise SqlRefused(f"only read-only SELECT queries are allowed; got {stmt.key.upper()}")
    for fn in stmt.find_all(exp.Anonymous, exp.Func):
        name = (fn.name if isinstance(fn, exp.Anonymous) else fn.sql_name()).lower()
        if (
            name in _FORBIDDEN_FUNCTIONS
            or name.startswith(_FORBIDDEN_FUNCTION_PREFIXES)
            or name.endswith(_FORBIDDEN_FUNCTION_SUFFIXES)
        ):
            raise SqlRefused(f"function {name}() is not allowed")
    ctes = {cte.alias_or_name.lower() for cte in stmt.find_all(exp.CTE)}
    known = {t.lower() for t in known_tables}
    allowed = known if allowed_tables is None else {t.lower() for t in allowed_tables}
    used: set[str] = set()
    for table in stmt.find_all(exp.Table):
        name = table.name.lower()
        if not name:
            raise SqlRefused("table-valued expressions are not allowed in FROM")
        if table.args.get("db") or table.args.get("catalog"):
            raise SqlRefused(f"schema-qualified table {table.sql(dialect)!r} is not allowed")
        if name in ctes:
            continue
        if name not in known:
            raise SqlRefused(f"no such table: {name} (tables: {', '.join(sorted(known))})")
        if name not in allowed:
            raise SqlRefused(f"table {name!r} is outside this caller's scope")
        used.add(name)
    normal = stmt.sql(dialect=dialect)
    executed = f"SELECT * FROM ({normal}) AS _guarded LIMIT {row_limit + 1}"
    return GuardedQuery(normal, executed, frozenset(used), row_limit)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


class SqlDatabase(Protocol):
    """A database the text-to-SQL service can describe and query read-only."""

    dialect: str

    def schema(self) -> Mapping[str, tuple[str, ...]]:
        """Table name -> column names."""
        ...

    def ddl(self, tables: Sequence[str]) -> str:
        """CREATE TABLE statements for `tables` (what the model is shown)."""
        ...

    def execute(self, query: GuardedQuery, timeout_s: float) -> QueryResult: ...


# sqlite3 authorizer action codes a read-only query needs.
_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)


class SQLiteDatabase:
    """A SQLite file, opened read-only for every query."""

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise DatabaseNotFound(
                f"no SQLite database at {self.path} (the sample one: python -m "
                "expertmesh.serving.sql_demo --build)"
            )
        self._schema: dict[str, tuple[str, ...]] | None = None

    max_value_bytes = 1_000_000
    """Largest string or blob a query may build (randomblob(1e9) is one VM step, so the
    deadline alone would not stop it allocating a gigabyte)."""

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.max_value_bytes)
        return conn

    def schema(self) -> Mapping[str, tuple[str, ...]]:
        if self._schema is None:
            conn = self._connect()
            try:
                names = [
                    r[0]
                    for r in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE 'sqlite_%' ORDER BY name"
                    )
                ]
                self._schema = {
                    n: tuple(r[1] for r in conn.execute(f'PRAGMA table_info("{n}")')) for n in names
                }
            finally:
                conn.close()
        return self._schema

    def ddl(self, tables: Sequence[str]) -> str:
        conn = self._connect()
        try:
            out = []
            for t in tables:
                row = conn.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (t,)
                ).fetchone()
                if row and row[0]:
                    out.append(row[0].strip() + ";")
            return "\n".join(out)
        finally:
            conn.close()

    def execute(self, query: GuardedQuery, timeout_s: float) -> QueryResult:
        conn = self._connect()
        started = time.monotonic()
        deadline = started + timeout_s

        def authorizer(action: int, *_args: Any) -> int:
            return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY

        conn.set_authorizer(authorizer)
        # Called every 1000 VM instructions; a non-zero return interrupts the query.
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            cur = conn.execute(query.executed_sql)
            rows = cur.fetchall()
            columns = tuple(d[0] for d in cur.description or ())
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                raise SqlTimeout(f"the query ran past its {timeout_s:g} s limit") from e
            raise SqlExecutionError(str(e)) from e
        except sqlite3.DatabaseError as e:
            raise SqlExecutionError(str(e)) from e
        finally:
            conn.close()
        truncated = len(rows) > query.row_limit
        return QueryResult(
            columns,
            tuple(tuple(r) for r in rows[: query.row_limit]),
            truncated,
            time.monotonic() - started,
        )


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


def open_database(url_or_path: str | Path) -> SqlDatabase:
    """A database from a path or URL: a SQLite file (`path`, `sqlite:///path`) or PostgreSQL
    (`postgresql://`, `postgres://`, `postgresql+psycopg://`; needs the `postgres` extra). Other
    schemes raise `DatabaseUnsupported`."""
    text = str(url_or_path)
    if text.startswith(("postgresql:", "postgres:", "postgresql+")):
        scheme, _, rest = text.partition("://")
        if scheme not in ("postgresql", "postgres", "postgresql+psycopg") or not rest:
            raise DatabaseUnsupported(
                f"unsupported PostgreSQL URL scheme {scheme!r}: use postgresql://user@host:port/db"
            )
        return PostgresDatabase(f"postgresql://{rest}")
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif "://" in text:
        raise DatabaseUnsupported(f"unsupported database URL scheme in {text.split('://')[0]!r}")
    return SQLiteDatabase(text)
