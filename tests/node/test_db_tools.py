"""`riha-node db migrate-to` (SQLite to a real PostgreSQL) and `riha-node db backup` (online, consistent)."""
from __future__ import annotations

import sqlite3
import stat
import subprocess
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from riha_node.db import Database
from riha_node.db_tools import MigrationError, backup, migrate_to
from riha_node.leader import Leadership
from riha_node.models import Base, Job, Study, StudyTransition, utcnow
from riha_node.storage import InstanceStore
from tests.node.peers import VENV_BIN, NodeProcess, dcmtk, dcmtk_env
from tests.node.samples import real_file
from tests.node.test_retention import stored_study


@pytest.fixture
def node(tmp_path) -> NodeProcess:
    """A node's configuration and SQLite database holding studies in several states (not running)."""
    node = NodeProcess(tmp_path / "node")
    node.workdir.mkdir(parents=True)
    node.write_config()
    return node


def populate(node: NodeProcess) -> Database:
    store = InstanceStore(node.storage_dir)
    store.prepare()
    db = Database(sqlite_url(node))
    db.upgrade()
    stored_study(db, store, "exported", days_ago=2, reports=2)  # the second SR names the first
    for state in ("receiving", "queued", "reported", "failed"):
        stored_study(db, store, state, days_ago=1)
    return db


def sqlite_url(node: NodeProcess) -> str:
    return f"sqlite:///{node.storage_dir / 'riha-node.db'}"


def all_rows(db: Database) -> dict[str, list[tuple]]:
    with db.read() as session:
        return {table.name: [tuple(row) for row in session.execute(
            select(table).order_by(*table.primary_key.columns))] for table in Base.metadata.sorted_tables}


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "riha-node"), "db", *args, "--config", str(node.config_path)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.peer
def test_migrate_to_copies_every_row_and_refuses_a_target_that_is_not_empty(node, postgres_url):
    source = populate(node)
    target = Database(postgres_url)
    try:
        result = cli(node, "migrate-to", postgres_url)
        assert result.returncode == 0, result.stderr
        assert 'database_url = "postgresql+psycopg://' in result.stdout
        assert "studies                     5 rows copied" in result.stdout
        expected = all_rows(source)
        assert all_rows(target) == expected, "every table, row for row"
        with target.session() as session:  # the id sequences moved past the copied rows
            study = Study(study_uid="1.2.3", state="receiving", priority=2, calling_ae="PACS",
                          first_received_at=utcnow(), last_received_at=utcnow(), state_changed_at=utcnow())
            session.add(study)
            session.flush()
            assert study.id == max(row[0] for row in expected["studies"]) + 1

        again = cli(node, "migrate-to", postgres_url)
        assert again.returncode == 2
        assert again.stderr.strip().count("\n") == 0 and "Traceback" not in again.stderr
        assert "not empty" in again.stderr
    finally:
        source.dispose()
        target.dispose()


@pytest.mark.peer
def test_migrate_to_refuses_while_a_node_runs_on_the_database(node, postgres_url):
    populate(node).dispose()
    running_serve = Leadership(sqlite_url(node), recheck_s=0)
    assert running_serve.holds()
    try:
        with pytest.raises(MigrationError, match="serve is running"):
            migrate_to(sqlite_url(node), postgres_url)
    finally:
        running_serve.release()
    db = Database(sqlite_url(node))
    with db.session() as session:  # a worker heartbeating its lease: a `riha-node worker` still at work
        session.add(Job(study_id=1, kind="report", state="running", priority=2, enqueued_at=utcnow(), attempts=1,
                        lease_owner="host:1", lease_expires_at=utcnow() + timedelta(minutes=1)))
    db.dispose()
    with pytest.raises(MigrationError, match="held by a running worker"):
        migrate_to(sqlite_url(node), postgres_url)
    target = Database(postgres_url)
    try:
        with target.engine.connect() as connection:
            assert not target.engine.dialect.has_table(connection, "studies"), "nothing was written to the target"
    finally:
        target.dispose()


def test_migrate_to_wants_a_postgresql_target(node, tmp_path):
    populate(node).dispose()
    with pytest.raises(MigrationError, match="must be a PostgreSQL URL"):
        migrate_to(sqlite_url(node), f"sqlite:///{tmp_path / 'other.db'}")


def test_backup_is_consistent_while_another_connection_writes(database, tmp_path):
    stop, writing = threading.Event(), threading.Event()

    def writer():  # each transaction adds a study and its transition: a torn copy would show unequal counts
        index = 0
        while not stop.is_set():
            index += 1
            with database.session() as session:
                study = Study(study_uid=f"1.2.{index}", state="receiving", priority=2, calling_ae="PACS",
                              first_received_at=utcnow(), last_received_at=utcnow(), state_changed_at=utcnow())
                session.add(study)
                session.flush()
                session.add(StudyTransition(study_id=study.id, to_state="receiving", at=utcnow()))
            writing.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(timeout=30)
        copies = [backup(database.url, tmp_path / f"copy{i}.db") for i in range(3)]
    finally:
        stop.set()
        thread.join()
    for copy in copies:
        assert stat.S_IMODE(copy.path.stat().st_mode) == 0o600
        with sqlite3.connect(copy.path) as connection:
            studies = connection.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
            transitions = connection.execute("SELECT COUNT(*) FROM study_transitions").fetchone()[0]
        assert studies == transitions == copy.studies > 0
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.peer
@pytest.mark.slow
def test_db_backup_while_serve_runs(tmp_path):
    node = NodeProcess(tmp_path / "node").start()
    try:
        sent = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1", str(node.port),
                               str(real_file("RG1_UNCR.dcm"))], capture_output=True, text=True, env=dcmtk_env())
        assert sent.returncode == 0, sent.stderr
        result = cli(node, "backup", str(tmp_path / "riha-node-backup.db"))
        assert result.returncode == 0, result.stderr
        assert "backup of 1 studies written" in result.stdout
        again = cli(node, "backup", str(tmp_path / "riha-node-backup.db"))
        assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    finally:
        assert node.stop() == 0
    with sqlite3.connect(tmp_path / "riha-node-backup.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
