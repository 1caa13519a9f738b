"""Retention: received images of delivered studies are deleted after `retention_days`; rows and SRs stay."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from riha_node.db import Database
from riha_node.models import Export, Instance, Job, Report, Study, StudyTransition, utcnow
from riha_node.retention import Purged, purge_expired, purge_interval_s
from riha_node.storage import InstanceStore
from tests.node.peers import NodeProcess

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class StoredStudy:
    id: int
    image_paths: list[Path]
    sr_path: Path | None


def stored_study(db: Database, store: InstanceStore, state: str, days_ago: float, images: int = 2,
                 image_bytes: int = 1000, reports: int = 1) -> StoredStudy:
    """A study as the node leaves it, with its files: instances, job, transitions, reports (each after the first
    naming its predecessor) and their exports, delivered when the study is `exported`."""
    received = utcnow() - timedelta(days=days_ago)
    study_uid, series_uid = generate_uid(), generate_uid()
    image_paths, sr_path = [], None
    with db.session() as session:
        study = Study(study_uid=study_uid, state=state, priority=2, patient_key="0" * 64, accession_number="A1",
                      calling_ae="PACS", first_received_at=received, last_received_at=received,
                      state_changed_at=received)
        session.add(study)
        session.flush()
        session.add(StudyTransition(study_id=study.id, from_state=None, to_state=state, reason="test", at=received))
        for _ in range(images):
            sop_uid = generate_uid()
            rel_path = store.relative_path(study_uid, series_uid, sop_uid)
            store.write_durably(rel_path, [b"\x01" * image_bytes])
            image_paths.append(store.path(rel_path))
            session.add(Instance(study_id=study.id, sop_instance_uid=sop_uid, sop_class_uid=CR_IMAGE_STORAGE,
                                 series_uid=series_uid, transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CR",
                                 body_part="CHEST", rel_path=rel_path, size_bytes=image_bytes,
                                 dataset_sha256="0" * 64, calling_ae="PACS", received_at=received))
        session.add(Job(study_id=study.id, kind="report", state="done", priority=2, enqueued_at=received,
                        attempts=1, finished_at=received))
        predecessor = None
        for _ in range(reports):
            sop_uid = generate_uid()
            rel_path = f"reports/{study_uid}/{sop_uid}.dcm"
            store.write_durably(rel_path, [b"SR"])
            sr_path = store.path(rel_path)
            report = Report(study_id=study.id, sop_instance_uid=sop_uid, series_uid=generate_uid(),
                            sop_class_uid=COMPREHENSIVE_SR, rel_path=rel_path, findings="text",
                            model_version="test", source_instances=images, predecessor_id=predecessor,
                            created_at=received)
            session.add(report)
            session.flush()
            predecessor = report.id
            delivered = state == "exported"
            session.add(Export(report_id=report.id, destination="PACS", state="delivered" if delivered else "pending",
                               attempts=1, next_attempt_at=received, delivered_at=received if delivered else None))
        return StoredStudy(study.id, image_paths, sr_path)


@pytest.fixture
def store(tmp_path) -> InstanceStore:
    store = InstanceStore(tmp_path / "storage")
    store.prepare()
    return store


def purged_at(db: Database, study_id: int) -> list:
    with db.read() as session:
        return list(session.scalars(select(Instance.purged_at).where(Instance.study_id == study_id)))


def test_only_delivered_studies_past_the_period_lose_their_images(database, store):
    expired = stored_study(database, store, "exported", days_ago=31, images=3, image_bytes=1500)
    recent = stored_study(database, store, "exported", days_ago=29)
    kept = [stored_study(database, store, state, days_ago=60)
            for state in ("reported", "export_failed", "receiving", "queued", "processing", "failed")]

    result = purge_expired(database, store, retention_days=30)

    assert result == Purged(studies=1, instances=3, bytes_freed=4500)
    assert not any(path.exists() for path in expired.image_paths)
    assert expired.sr_path.exists(), "the draft SR is kept"
    assert not expired.image_paths[0].parent.parent.exists(), "the emptied study folder goes"
    assert all(at is not None for at in purged_at(database, expired.id)), "each row stays, marked purged"
    for study in (recent, *kept):
        assert all(path.exists() for path in study.image_paths), "never before the draft was delivered"
        assert purged_at(database, study.id) == [None] * len(study.image_paths)
    assert purge_expired(database, store, retention_days=30) == Purged(), "a second run has nothing to do"


def test_a_file_already_gone_is_marked_without_failing(database, store):
    study = stored_study(database, store, "exported", days_ago=10)
    study.image_paths[0].unlink()  # as after a purge interrupted between the unlink and the commit
    assert purge_expired(database, store, retention_days=1) == Purged(studies=1, instances=2, bytes_freed=1000)
    assert None not in purged_at(database, study.id)


def test_zero_keeps_every_image(database, store):
    study = stored_study(database, store, "exported", days_ago=3650)
    assert purge_expired(database, store, retention_days=0) == Purged()
    assert all(path.exists() for path in study.image_paths)


def test_the_purge_runs_often_enough_and_never_busily():
    assert purge_interval_s(30) == 3600.0
    assert purge_interval_s(0.001) == pytest.approx(8.64)
    assert purge_interval_s(1e-9) == 1.0


@pytest.mark.peer
def test_serve_purges_on_its_schedule(tmp_path):
    """A node started with retention purges an expired delivered study at once (its first run is at start)."""
    node = NodeProcess(tmp_path / "node", extra_toml="")
    node.workdir.mkdir(parents=True)
    node.write_config()
    node.config_path.write_text(node.config_path.read_text().replace("[study]\n", "[study]\nretention_days = 30\n"))
    store = InstanceStore(node.storage_dir)
    store.prepare()
    db = Database(f"sqlite:///{node.storage_dir / 'riha-node.db'}")
    db.upgrade()
    expired = stored_study(db, store, "exported", days_ago=40)
    waiting = stored_study(db, store, "reported", days_ago=40)
    db.dispose()
    node.start()
    try:
        node.wait_for(lambda: '"event": "received images purged"' in node.log_text(), timeout=30,
                      what="the scheduled purge")
    finally:
        assert node.stop() == 0
    assert not any(path.exists() for path in expired.image_paths)
    assert all(path.exists() for path in waiting.image_paths)
    purge_line = next(line for line in node.log_text().splitlines() if '"received images purged"' in line)
    assert '"instances": 2' in purge_line and '"bytes_freed": 2000' in purge_line
