"""Leadership: which `riha-node serve` runs the scheduler's periodic jobs when several share one database.

On PostgreSQL the leader holds a session-level advisory lock (pg_try_advisory_lock) on a connection of its own; the
lock lives exactly as long as that connection, so a leader that dies (even `kill -9`) or loses its connection frees
it, and a standby, which tries again on each check, takes over. On SQLite the leader holds an exclusive file lock
(flock) on `<database>.leader` beside the database file; the same lock tells `riha-node db migrate-to` that a node
is running. The periodic jobs are safe to run concurrently (row claims and state conditions), so leadership keeps
them from doing the same work twice; it is not what keeps a study from being processed twice.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Callable

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from riha_node.db import sqlite_path
from riha_node.log import get_logger

log = get_logger(__name__)

# One fixed key per database: advisory locks are scoped to the database, so nodes on other databases never collide.
ADVISORY_LOCK_KEY = 0x52494841  # "RIHA"
RECHECK_S = 2.0  # how often a leader confirms its connection is alive, and a standby tries to take over
# A leader whose machine dies or drops off the network sends no FIN: without keepalives PostgreSQL would keep its
# session, and the lock, for hours. These free it within about 25 s (server side: the lock is released) and make a
# cut-off leader's own check fail within 30 s (client side: it stops acting as leader).
DEAD_PEER_DETECTION = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
}


def sqlite_lock_path(database_url: str) -> Path | None:
    """The leader lock file of an SQLite database, None for an in-memory one."""
    path = sqlite_path(database_url)
    return path.with_name(f"{path.name}.leader") if path is not None else None


class Leadership:
    """`holds()` is True in exactly one process per database at a time (checked again every RECHECK_S)."""

    def __init__(self, database_url: str, recheck_s: float = RECHECK_S):
        self.database_url = database_url
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._held = False
        self._checked_at = float("-inf")
        self._connection: Connection | None = None
        self._lock_file: int | None = None
        self._engine = None if database_url.startswith("sqlite") else create_engine(
            database_url, poolclass=NullPool, connect_args=DEAD_PEER_DETECTION)

    def holds(self) -> bool:
        with self._lock:
            if time.monotonic() - self._checked_at >= self.recheck_s:
                first_check = self._checked_at == float("-inf")
                self._checked_at = time.monotonic()
                was_held = self._held
                self._held = self._confirm() if was_held else self._try_acquire()
                if self._held != was_held:
                    log.info("leadership acquired" if self._held else "leadership lost", pid=os.getpid())
                elif first_check:
                    log.info("standby: another node runs the periodic jobs", pid=os.getpid())
            return self._held

    def run_if_leader(self, job: Callable, *args) -> None:
        """The scheduler's wrapper for a periodic job: only the leader runs it."""
        if self.holds():
            job(*args)

    def release(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()  # ends the session: PostgreSQL releases the advisory lock
                self._connection = None
            if self._lock_file is not None:
                os.close(self._lock_file)  # closing the descriptor drops the flock
                self._lock_file = None
            if self._held:
                log.info("leadership released", pid=os.getpid())
            self._held = False
            self._checked_at = float("-inf")
        if self._engine is not None:
            self._engine.dispose()

    def _try_acquire(self) -> bool:
        if self._engine is None:
            return self._try_lock_file()
        try:
            connection = self._engine.connect()
            taken = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY}).scalar()
            connection.commit()  # the lock is session-level: it outlives the transaction
        except DBAPIError as exc:
            log.warning("leadership check failed", error=type(exc.orig).__name__)
            return False
        if taken:
            self._connection = connection
            return True
        connection.close()
        return False

    def _confirm(self) -> bool:
        if self._connection is None:  # SQLite: the flock holds as long as the descriptor is open
            return True
        try:
            self._connection.execute(text("SELECT 1")).scalar()
            self._connection.commit()
            return True
        except DBAPIError as exc:
            log.warning("leader connection lost", error=type(exc.orig).__name__)
            self._connection.invalidate()
            self._connection = None
            return False

    def _try_lock_file(self) -> bool:
        path = sqlite_lock_path(self.database_url)
        if path is None:
            return True  # an in-memory database belongs to this process alone
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not lock_exclusively(descriptor):
            os.close(descriptor)
            return False
        self._lock_file = descriptor
        return True


def lock_exclusively(descriptor: int) -> bool:
    """Take an exclusive flock without waiting; False when another process holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
