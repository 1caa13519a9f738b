"""Database maintenance beyond migrations: move an SQLite installation to PostgreSQL, back up SQLite online.

`migrate_to` copies every table in dependency order inside one transaction on the target, after bringing the target
to the newest schema, and commits only when every table's row count matches: a failure leaves the target empty and
the SQLite database untouched. It refuses while a node runs on the SQLite database (the leader lock of
riha_node.leader is held, or a worker's lease is live), because a study received during the copy would be lost.

`backup` uses SQLite's online backup API: one consistent snapshot, taken while `serve` keeps writing.
"""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, inspect, make_url, select, text
from sqlalchemy.engine import Connection

from riha_node.db import Database, sqlite_path
from riha_node.errors import UserError
from riha_node.leader import lock_exclusively, sqlite_lock_path
from riha_node.log import get_logger
from riha_node.models import Base, Job, utcnow
from riha_node.states import JobState

log = get_logger(__name__)

COPY_BATCH_ROWS = 1000
POSTGRES_PREFIX = "postgresql+psycopg://"
ALEMBIC_TABLE = "alembic_version"


class MigrationError(UserError):
    """The move to PostgreSQL was refused or failed; the message says why and what to do."""


@dataclass(frozen=True)
class Copied:
    rows_by_table: dict[str, int]
    target_url: str  # password hidden


def sqlite_file(database_url: str) -> Path:
    """The SQLite database file of a configured URL, which must exist."""
    path = sqlite_path(database_url)
    if path is None:
        raise UserError(f"This works on the SQLite database only, and the configured database is "
                        f"{make_url(database_url).render_as_string(hide_password=True)}.")
    if not path.is_file():
        raise UserError(f"No SQLite database at {path}: check [node] storage_dir / database_url.")
    return path


def migrate_to(source_url: str, target_url: str) -> Copied:
    source_path = sqlite_file(source_url)
    if not target_url.startswith(POSTGRES_PREFIX):
        raise MigrationError(f"The target must be a PostgreSQL URL starting with {POSTGRES_PREFIX} "
                             "(e.g. postgresql+psycopg://riha:PASSWORD@db-host/riha).")
    lock_path = sqlite_lock_path(source_url)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not lock_exclusively(descriptor):  # held for the whole copy, so no serve can start meanwhile
            raise MigrationError(f"A riha-node serve is running on {source_path} (it holds {lock_path}); stop it "
                                 "and every riha-node worker, then run this again.")
        source, target = Database(source_url), Database(target_url)
        try:
            source.upgrade()
            _refuse_live_workers(source)
            target.upgrade()
            counts = _copy_all(source, target)
        finally:
            source.dispose()
            target.dispose()
    finally:
        os.close(descriptor)
    log.info("database migrated", tables=len(counts), rows=sum(counts.values()))
    return Copied(counts, target.safe_url)


def _refuse_live_workers(source: Database) -> None:
    with source.read() as session:
        leased = session.scalar(select(func.count()).select_from(Job).where(
            Job.state == JobState.RUNNING.value, Job.lease_expires_at > utcnow()))
    if leased:
        raise MigrationError(f"{leased} job(s) are held by a running worker; stop every riha-node worker (and "
                             "serve), then run this again.")


def _copy_all(source: Database, target: Database) -> dict[str, int]:
    tables = Base.metadata.sorted_tables  # parents before children
    unknown = set(inspect(source.engine).get_table_names()) - {t.name for t in tables} - {ALEMBIC_TABLE}
    if unknown:
        raise MigrationError(f"The SQLite database has tables this version does not know "
                             f"({', '.join(sorted(unknown))}); run the riha-node version that created them.")
    counts: dict[str, int] = {}
    with source.read() as session, target.engine.begin() as destination:
        origin = session.connection()  # one read transaction: a consistent snapshot of every table
        filled = [t.name for t in tables if destination.execute(select(func.count()).select_from(t)).scalar()]
        if filled:
            raise MigrationError(f"The target database is not empty (rows in {', '.join(filled)}); give an empty "
                                 "database, it is never merged into.")
        for table in tables:
            rows = origin.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            while batch := rows.fetchmany(COPY_BATCH_ROWS):
                destination.execute(insert(table), [dict(row) for row in batch])
            _advance_sequence(destination, table)
            counts[table.name] = origin.execute(select(func.count()).select_from(table)).scalar()
            copied = destination.execute(select(func.count()).select_from(table)).scalar()
            if copied != counts[table.name]:
                raise MigrationError(f"Table {table.name}: {counts[table.name]} rows in SQLite but {copied} copied; "
                                     "nothing was committed.")
    return counts


def _advance_sequence(destination: Connection, table) -> None:
    """Rows were inserted with their ids: move the id sequence past them, or the next insert would collide."""
    for column in table.primary_key.columns:
        if column.autoincrement is not False and column.type.python_type is int:
            destination.execute(text(
                f"SELECT setval(pg_get_serial_sequence(:table, :column), "
                f"COALESCE((SELECT MAX({column.name}) FROM {table.name}), 0) + 1, false)"),
                {"table": table.name, "column": column.name})


@dataclass(frozen=True)
class Backup:
    path: Path
    size_bytes: int
    studies: int


def backup(database_url: str, destination: Path) -> Backup:
    """A consistent copy of the SQLite database at `destination` (owner-only), checked before it is kept."""
    source_path = sqlite_file(database_url)
    destination = destination.resolve()
    if destination.exists():
        raise UserError(f"{destination} already exists; give a new file name (a backup never overwrites).")
    if not destination.parent.is_dir():
        raise UserError(f"Folder {destination.parent} does not exist; create it or give another path.")
    partial = destination.with_name(destination.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # owner-only from the start
    try:
        with closing(sqlite3.connect(source_path, timeout=30)) as origin, \
                closing(sqlite3.connect(partial)) as copy:
            origin.backup(copy)  # one step: a snapshot of a single read transaction
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise UserError(f"The backup failed its integrity check ({check}); the database may be damaged.")
            copy.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            studies = copy.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        os.replace(partial, destination)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    log.info("database backed up", studies=studies, size_bytes=destination.stat().st_size)
    return Backup(destination, destination.stat().st_size, studies)

