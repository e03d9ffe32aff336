"""The review queue's database: SQLite by default (a file, no set-up), PostgreSQL when given a
`postgresql://` URL, one schema kept by numbered migrations (`MIGRATIONS`) that both run.

Statements are written once with `?` placeholders and the few types that differ are named in
`TYPES`; a migration is applied in a transaction and recorded in `schema_migrations`, so a
database is brought up to date by `Database.migrate()` whatever version it was at.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_URL = "sqlite:///review/review.db"
TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"},
    "postgresql": {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA"},
}
# (version, what it does, statements); never edit one that has shipped: add the next
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "reviewers, sessions, the queue of listings, their photos, the decisions", [
        """CREATE TABLE reviewers (id {id}, name TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL,
               created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE sessions (token_hash TEXT PRIMARY KEY,
               reviewer_id BIGINT NOT NULL REFERENCES reviewers(id), csrf TEXT NOT NULL,
               expires_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE listings (id {id}, source TEXT NOT NULL, source_id TEXT NOT NULL,
               text TEXT, product_name TEXT, product_description TEXT,
               model TEXT NOT NULL, model_version TEXT, answer TEXT NOT NULL,
               probability DOUBLE PRECISION NOT NULL, added_at DOUBLE PRECISION NOT NULL,
               status TEXT NOT NULL DEFAULT 'open', claimed_by BIGINT REFERENCES reviewers(id),
               claimed_until DOUBLE PRECISION, UNIQUE (source, source_id))""",
        "CREATE INDEX listings_open ON listings (status, added_at)",
        """CREATE TABLE photos (id {id}, listing_id BIGINT NOT NULL REFERENCES listings(id),
               position INTEGER NOT NULL, data {blob} NOT NULL)""",
        """CREATE TABLE decisions (id {id}, listing_id BIGINT NOT NULL UNIQUE REFERENCES listings(id),
               reviewer_id BIGINT NOT NULL REFERENCES reviewers(id), decided_at DOUBLE PRECISION NOT NULL,
               model_version TEXT, accepted BOOLEAN NOT NULL, path TEXT NOT NULL)""",
        "CREATE TABLE taxonomy (path TEXT PRIMARY KEY)",
    ]),
    (2, "failed sign-ins, to slow down password guessing", [
        "CREATE TABLE sign_in_failures (id {id}, name TEXT NOT NULL, failed_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX sign_in_failures_name ON sign_in_failures (name, failed_at)",
    ]),
]


class DatabaseError(RuntimeError):
    """A database URL that cannot be used, or a database that cannot be reached."""


class Database:
    """One connection (SQLite) or one per call (PostgreSQL, which serves many) behind `?`
    statements. Thread-safe: the web app's threads share it."""

    def __init__(self, url: str = DEFAULT_URL):
        parsed = urlparse(url)
        if parsed.scheme == "sqlite":
            self.dialect, self.path = "sqlite", Path(url.removeprefix("sqlite:///") or "review.db")
        elif parsed.scheme in ("postgresql", "postgres"):
            self.dialect, self.path = "postgresql", None
        else:
            raise DatabaseError(f"unsupported database URL scheme {parsed.scheme!r}: use sqlite:///FILE "
                                "or postgresql://USER@HOST:PORT/NAME")
        self.url, self.lock = url, threading.RLock()
        self._sqlite: sqlite3.Connection | None = None

    # ------------------------------------------------------------ connections
    def connect(self):
        if self.dialect == "sqlite":
            if self._sqlite is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._sqlite = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._sqlite.execute("PRAGMA foreign_keys = ON")
                self._sqlite.execute("PRAGMA journal_mode = WAL")
            return self._sqlite
        import psycopg

        try:
            return psycopg.connect(self.url, autocommit=True)
        except psycopg.OperationalError as error:
            raise DatabaseError(f"cannot reach the database: {str(error).splitlines()[0]}") from error

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Statements that commit together (or not at all)."""
        with self.lock:
            connection = self.connect()
            try:
                connection.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
                yield Transaction(connection, self.dialect)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            finally:
                if self.dialect != "sqlite":
                    connection.close()

    def query(self, sql: str, parameters: Sequence = ()) -> list[tuple]:
        with self.transaction() as transaction:
            return transaction.query(sql, parameters)

    def execute(self, sql: str, parameters: Sequence = ()) -> int:
        with self.transaction() as transaction:
            return transaction.execute(sql, parameters)

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None

    # ------------------------------------------------------------ schema
    def version(self) -> int:
        with self.transaction() as transaction:
            transaction.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                                "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            return int(transaction.query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0][0])

    def migrate(self) -> list[int]:
        """Apply the migrations this database has not had, each in its own transaction; the
        versions applied."""
        applied, current = [], self.version()
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            with self.transaction() as transaction:
                for statement in statements:
                    transaction.execute(statement.format(**TYPES[self.dialect]))
                transaction.execute("INSERT INTO schema_migrations (version, description, applied_at) "
                                    "VALUES (?, ?, ?)", (version, description, time.time()))
            applied.append(version)
        return applied


class Transaction:
    """The statements of one transaction, written with `?` placeholders for either database."""

    def __init__(self, connection, dialect: str):
        self.connection, self.dialect = connection, dialect

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    def execute(self, sql: str, parameters: Sequence = ()) -> int:
        """The statement's row count."""
        cursor = self.connection.execute(self._sql(sql), tuple(parameters))
        return cursor.rowcount

    def insert(self, sql: str, parameters: Sequence = ()) -> int:
        """An INSERT's new id."""
        if self.dialect == "sqlite":
            return int(self.connection.execute(sql, tuple(parameters)).lastrowid)
        return int(self.connection.execute(self._sql(sql) + " RETURNING id", tuple(parameters)).fetchone()[0])

    def query(self, sql: str, parameters: Sequence = ()) -> list[tuple]:
        return [tuple(row) for row in self.connection.execute(self._sql(sql), tuple(parameters)).fetchall()]
