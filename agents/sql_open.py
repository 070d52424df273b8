"""Opening a text-to-SQL database from a path or URL (SQLite or PostgreSQL).

    db = open_database("shakespeare.sqlite")                # SQLiteDatabase, read-only
    db = open_database("postgresql://reader@db:5432/shop")  # PostgresDatabase (`postgres` extra)

The one place that knows both runners, so `sql_guard` (the guard and the SQLite runner) and
`sql_postgres` depend on nothing but the guard's types.
"""

from __future__ import annotations

from pathlib import Path

from .sql_guard import DatabaseUnsupported, SqlDatabase, SQLiteDatabase
from .sql_postgres import PostgresDatabase


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
