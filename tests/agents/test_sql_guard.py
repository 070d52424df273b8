"""The SQL guard refuses writes, stacked statements, out-of-scope tables and file access, and
the runner enforces the row limit and the timeout."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from expertmesh.agents.sql_demo import build_sample_db
from expertmesh.agents.sql_guard import (
    DatabaseUnsupported,
    SqlExecutionError,
    SQLiteDatabase,
    SqlRefused,
    SqlTimeout,
    check_sql,
)
from expertmesh.agents.sql_open import open_database

TABLES = ("plays", "characters", "scenes")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> SQLiteDatabase:
    return SQLiteDatabase(build_sample_db(tmp_path_factory.mktemp("sql") / "s.sqlite"))


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("DELETE FROM plays", "read-only"),
        ("UPDATE plays SET year = 1", "read-only"),
        ("INSERT INTO plays VALUES (11, 'x', 'y', 1)", "read-only"),
        ("DROP TABLE plays", "read-only"),
        ("CREATE TABLE t (x)", "read-only"),
        ("PRAGMA writable_schema = 1", "read-only"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "read-only"),
        ("VACUUM INTO '/tmp/copy.db'", "read-only"),
        ("BEGIN", "read-only"),
        ("SELECT 1; DELETE FROM plays", "one statement"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("SELECT load_extension('evil')", "load_extension"),
        ("SELECT * FROM sqlite_master", "no such table"),
        ("SELECT * FROM other.plays", "schema-qualified"),
        ("SELEC title FROM plays", "parse"),
        ("Fly, sir, I'll be not a word", "parse"),
        ("", "no SQL"),
    ],
)
def test_guard_refuses_dangerous_sql_with_a_reason(sql: str, reason: str) -> None:
    with pytest.raises(SqlRefused, match=reason):
        check_sql(sql, TABLES)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("COPY plays TO '/tmp/plays.csv'", "read-only"),
        ("COPY (SELECT 1) TO PROGRAM 'id'", "read-only"),
        ("SET statement_timeout = 0", "read-only"),
        ("SET TRANSACTION READ WRITE", "read-only"),
        ("DO $$ BEGIN DELETE FROM plays; END $$", "read-only"),
        ("CALL refresh()", "read-only"),
        ("LOCK TABLE plays", "read-only"),
        ("SELECT * FROM plays FOR UPDATE", "read-only"),
        ("WITH gone AS (DELETE FROM plays RETURNING *) SELECT * FROM gone", "read-only"),
        ("SELECT pg_sleep(5)", "pg_sleep"),
        ("SELECT pg_catalog.pg_sleep_for('5 minutes')", "pg_sleep_for"),
        ('SELECT "pg_sleep"(5)', "pg_sleep"),
        ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
        ("SELECT pg_read_binary_file('/etc/passwd')", "pg_read_binary_file"),
        ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
        ("SELECT lo_import('/etc/passwd')", "lo_import"),
        ("SELECT lo_export(1, '/tmp/x')", "lo_export"),
        ("SELECT * FROM dblink('host=h', 'DELETE FROM t') AS t(x int)", "dblink"),
        ("SELECT pg_terminate_backend(1)", "pg_terminate_backend"),
        ("SELECT set_config('statement_timeout', '0', false)", "set_config"),
        ("SELECT query_to_xml('SELECT * FROM secrets', true, true, '')", "query_to_xml"),
        ("SELECT nextval('plays_id_seq')", "nextval"),
        ("SELECT * FROM pg_catalog.pg_authid", "schema-qualified"),
        ("SELECT * FROM pg_user", "no such table"),
    ],
)
def test_guard_refuses_postgres_dangers_in_postgres_dialect(sql: str, reason: str) -> None:
    with pytest.raises(SqlRefused, match=reason):
        check_sql(sql, TABLES, dialect="postgres")


def test_guard_allows_postgres_reads_and_wraps_them_for_postgres() -> None:
    q = check_sql(
        "SELECT genre, STRING_AGG(title, ', ') FROM plays WHERE title ILIKE '%the%' "
        "AND year::text LIKE '16%' GROUP BY genre",
        TABLES,
        row_limit=5,
        dialect="postgres",
    )
    assert "STRING_AGG" in q.sql and "ILIKE" in q.sql
    assert q.executed_sql == f"SELECT * FROM ({q.sql}) AS _guarded LIMIT 6"


def test_guard_refuses_tables_outside_the_scope() -> None:
    with pytest.raises(SqlRefused, match="outside this caller's scope"):
        check_sql(
            "SELECT name FROM characters JOIN plays ON plays.id = play_id",
            TABLES,
            allowed_tables=frozenset({"characters"}),
        )


def test_guard_allows_a_select_with_cte_and_wraps_the_row_limit() -> None:
    q = check_sql("WITH t AS (SELECT title FROM plays) SELECT * FROM t", TABLES, row_limit=5)
    assert q.tables == {"plays"}
    assert q.executed_sql.endswith("LIMIT 6")


def test_runner_enforces_the_row_limit(db: SQLiteDatabase) -> None:
    result = db.execute(check_sql("SELECT name FROM characters", TABLES, row_limit=3), 2.0)
    assert len(result.rows) == 3
    assert result.truncated


def test_runner_stops_a_recursive_cte_that_never_ends(db: SQLiteDatabase) -> None:
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    started = time.monotonic()
    with pytest.raises(SqlTimeout):
        db.execute(check_sql(sql, TABLES), timeout_s=0.2)
    assert time.monotonic() - started < 2.0


def test_runner_opens_the_file_read_only(db: SQLiteDatabase) -> None:
    conn = db._connect()
    with pytest.raises(Exception, match=r"readonly|read-only|query_only"):
        conn.execute("DELETE FROM plays")
    conn.close()


def test_postgres_without_the_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    with pytest.raises(DatabaseUnsupported, match=r"pip install 'expertmesh\[postgres\]'"):
        open_database("postgresql://localhost/db")


def test_open_database_takes_sqlite_urls_and_refuses_unknown_schemes(tmp_path: Path) -> None:
    with pytest.raises(DatabaseUnsupported, match="mysql"):
        open_database("mysql://u@h/db")
    assert isinstance(
        open_database(f"sqlite:///{build_sample_db(tmp_path / 'x.sqlite')}"), SQLiteDatabase
    )


def test_bundled_sample_database_is_what_the_generator_writes(tmp_path: Path) -> None:
    from expertmesh.agents.sql_demo import SAMPLE_DB

    fresh = SQLiteDatabase(build_sample_db(tmp_path / "fresh.sqlite"))
    bundled = SQLiteDatabase(SAMPLE_DB)
    assert bundled.schema() == fresh.schema()
    for table in fresh.schema():
        q = check_sql(f"SELECT * FROM {table} ORDER BY id", TABLES, row_limit=1000)
        assert bundled.execute(q, 2.0).rows == fresh.execute(q, 2.0).rows


def test_runner_caps_the_size_of_values_a_query_builds(db: SQLiteDatabase) -> None:
    with pytest.raises(SqlExecutionError, match="too big"):
        db.execute(check_sql("SELECT randomblob(1000000000)", TABLES), 2.0)
