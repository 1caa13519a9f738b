"""Scale-out on a real PostgreSQL: migrations, scheduler leadership, and serve with extra workers, each study once."""
from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import psycopg
import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import make_url, select

from riha_model.phantoms import write_phantoms
from riha_node.db import Database, alembic_config
from riha_node.leader import Leadership
from riha_node.models import Base, Report, Study, StudyTransition
from tests.node.peers import VENV_BIN, NodeProcess, StorescpProcess, dcmtk, dcmtk_env

pytestmark = pytest.mark.peer


def test_migrations_reach_head_and_match_the_models(database_url):
    db = Database(database_url)
    try:
        db.upgrade()
        db.upgrade()  # idempotent: serve and every worker run it at start
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        with db.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert context.get_current_revision() == head
            assert compare_metadata(context, Base.metadata) == [], "the migrations and riha_node.models differ"
    finally:
        db.dispose()


def test_one_leader_at_a_time_and_a_standby_takes_over_when_it_goes(database_url):
    first, second = Leadership(database_url, recheck_s=0), Leadership(database_url, recheck_s=0)
    try:
        assert first.holds()
        assert not second.holds()
        assert first.holds(), "the leader keeps its lock on every check"
        first.release()
        assert second.holds()
        assert not first.holds()
    finally:
        first.release()
        second.release()


def test_a_leader_whose_connection_dies_loses_leadership_to_the_standby(postgres_url):
    leader, standby = Leadership(postgres_url, recheck_s=0), Leadership(postgres_url, recheck_s=0)
    url = make_url(postgres_url)
    try:
        assert leader.holds() and not standby.holds()
        with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database,
                             autocommit=True) as admin:  # as a network failure or a restarted database would
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks "
                                   "WHERE locktype = 'advisory' AND granted").fetchall()
        assert killed == [(True,)]
        assert not leader.holds()
        assert standby.holds()
    finally:
        leader.release()
        standby.release()


N_STUDIES = 6


def start_worker(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "riha-node"), "worker", "--config", str(config)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_serve_and_extra_workers_on_postgresql_report_every_study_exactly_once(tmp_path, postgres_url, monkeypatch,
                                                                               phantom_checkpoint):
    """Two serves (one leader, one standby) and three workers on one PostgreSQL database and one storage folder."""
    phantoms = write_phantoms(tmp_path / "phantoms", N_STUDIES, seed=11, dicom=True, image_size=64).parent / "dicom"
    monkeypatch.setenv("RIHA_NODE_NODE_DATABASE_URL", postgres_url)  # serve, its workers and the CLI inherit it
    receiver = StorescpProcess(tmp_path / "received", aet="PACS").start()
    leader = NodeProcess(tmp_path / "leader", quiet_period_s=1.0, extra_toml=(
        f'[pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {receiver.port}\nbackoff_s = 0.5\n\n'
        f'[worker]\ndevice = "cpu"\nprocesses = 1\nbatch_size = 1\nlease_s = 10\nthreads = 1\n\n'
        f'[model]\ncheckpoint = "{phantom_checkpoint}"\n'))
    standby = NodeProcess(tmp_path / "standby")
    for node in (leader, standby):
        node.workdir.mkdir(parents=True)
    leader.write_config()
    standby.config_path.write_text(leader.config_path.read_text()
                                   .replace(f"port = {leader.port}", f"port = {standby.port}")
                                   .replace('storage_dir = "storage"', f'storage_dir = "{leader.storage_dir}"')
                                   .replace("processes = 1", "processes = 0"))
    workers: list[subprocess.Popen] = []
    try:
        leader.start()
        standby.start()
        workers = [start_worker(leader.config_path, tmp_path / f"worker{i}.log") for i in range(2)]
        worker_logs = [leader.log_path, tmp_path / "worker0.log", tmp_path / "worker1.log"]
        leader.wait_for(lambda: all('"event": "model loaded"' in p.read_text() for p in worker_logs if p.exists())
                        and all(p.exists() for p in worker_logs), timeout=90, what="three workers with the model")
        studies = sorted(phantoms.iterdir())
        for node, half in ((leader, studies[0::2]), (standby, studies[1::2])):  # both listen; the leader schedules
            files = [str(path) for study in half for path in sorted(study.glob("*.dcm"))]
            sent = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1", str(node.port),
                                   *files], capture_output=True, text=True, env=dcmtk_env())
            assert sent.returncode == 0, sent.stderr
        leader.wait_for(lambda: len(leader.studies("exported")) == N_STUDIES, timeout=120,
                        what="every study exported")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            assert worker.wait(timeout=60) == 0
        for node in (standby, leader):
            if node.process is not None:
                assert node.stop() == 0
        receiver.stop()

    sr_studies = Counter(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
                         for path in receiver.received())
    sent_studies = {pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
                    for study in phantoms.iterdir()}
    assert set(sr_studies) == sent_studies and set(sr_studies.values()) == {1}, "exactly one SR per study at PACS"
    db = Database(postgres_url)
    try:
        with db.read() as session:
            assert session.scalar(select(Study.id).where(Study.state != "exported")) is None
            reports = Counter(session.scalars(select(Report.study_id)))
            assert len(reports) == N_STUDIES and set(reports.values()) == {1}, "one report per study"
            transitions = session.execute(select(StudyTransition.study_id, StudyTransition.to_state,
                                                 StudyTransition.reason)).all()
    finally:
        db.dispose()
    for state in ("queued", "processing", "reported", "exported"):
        per_study = Counter(study_id for study_id, to_state, _ in transitions if to_state == state)
        assert sorted(per_study.values()) == [1] * N_STUDIES, f"a study entered {state} more than once"
    claimers = {reason for _, to_state, reason in transitions if to_state == "processing"}
    assert len(claimers) >= 2, f"the work was spread over the workers: {claimers}"
    assert leader.log_text().count('"event": "leadership acquired"') == 1
    assert '"event": "standby: another node runs the periodic jobs"' in standby.log_text()
    assert '"event": "study queued"' not in standby.log_text(), "only the leader closes studies"
