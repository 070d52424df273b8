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

PostgreSQL: `sql_postgres.PostgresDatabase` (the same protocol, read-only by the server too);
`sql_open.open_database` picks the runner from a path or URL.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError


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
                "expertmesh.agents.sql_demo --build)"
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
