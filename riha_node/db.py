"""Engines and sessions for SQLite (WAL, busy timeout, immediate write transactions) and PostgreSQL.

SQLite allows one writer at a time. Writers begin with BEGIN IMMEDIATE so that two threads never both read and then
fail to upgrade to a write lock (which SQLite answers with an immediate "database is locked"); the busy timeout makes
the second one wait instead.
"""
from __future__ import annotations

from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from riha_node.errors import UserError

SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATION_LOCK_KEY = 0x52494842  # a PostgreSQL advisory lock of its own (the leader's is riha_node.leader's)


class DatabaseError(UserError):
    """The database cannot be opened or upgraded."""


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite database URL; None for another engine or an in-memory database."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///")
    return Path(path) if path and path != ":memory:" else None


def driver_error(exc: SQLAlchemyError) -> BaseException:
    """The database driver's own exception behind SQLAlchemy's wrapper, when there is one (its type names the
    problem without the message, which may quote data)."""
    return getattr(exc, "orig", None) or exc


def _one_line(exc: SQLAlchemyError) -> str:
    return " ".join(str(driver_error(exc)).split())  # libpq's messages span lines: keep one


def make_engine(url: str, writer: bool = True) -> Engine:
    """`writer=False` on SQLite: plain (deferred) transactions, which in WAL mode never wait for the writer."""
    if url.startswith("sqlite"):
        if (path := sqlite_path(url)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_on_connect)
        begin = "BEGIN IMMEDIATE" if writer else "BEGIN"
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (see module docstring)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, like the file it points to
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """One engine and its session factory; `session()` commits on success and rolls back on error."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = make_engine(url, writer=False) if url.startswith("sqlite") else self.engine
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session:
            with session.begin():
                yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session: on SQLite it does not take the write lock, so it never queues behind writers."""
        with self._read_sessions() as session:  # closing it rolls the read transaction back
            yield session

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        try:
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql":  # serve and workers starting together migrate in turn
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                cfg = alembic_config()
                cfg.attributes["connection"] = connection
                command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise DatabaseError(f"Cannot upgrade the database at {self.safe_url}: {_one_line(exc)}") from None

    def require_current(self) -> None:
        """Commands that only read or edit rows need the newest schema: say how to get it instead of failing on a
        missing table or column."""
        try:
            with self.engine.connect() as connection:
                current = set(MigrationContext.configure(connection).get_current_heads())
        except SQLAlchemyError as exc:
            raise DatabaseError(f"Cannot open the database at {self.safe_url}: {_one_line(exc)}") from None
        if current != set(ScriptDirectory.from_config(alembic_config()).get_heads()):
            raise DatabaseError(f"The database at {self.safe_url} has an older schema than this riha-node; run "
                                "`riha-node db upgrade` (or restart `riha-node serve`, which upgrades it).")

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()
        self._read_engine.dispose()


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("riha_node.migrations")))
    return cfg
