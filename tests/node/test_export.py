"""The exporter against a real DICOM receiver: a delivery that runs out of attempts fails the study, is revived after
`retry_failed_after_s`, and delivers exactly once with every state change recorded once."""
from __future__ import annotations

import shutil
import time

from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from riha_node.config import load_config
from riha_node.db import Database
from riha_node.export import DELIVERED, PENDING, export_due
from riha_node.models import Export, Report, Study, StudyTransition, utcnow
from riha_node.storage import InstanceStore
from tests.node.peers import free_port, open_node
from tests.node.samples import real_file

RETRY_AFTER_S = 0.5


def reported_study(db: Database, store: InstanceStore) -> int:
    """A study whose draft SR (any DICOM file stands in for it here) waits for delivery to PACS."""
    rel_path = "reports/draft.dcm"
    store.path(rel_path).parent.mkdir(parents=True)
    shutil.copyfile(real_file("RG1_UNCR.dcm"), store.path(rel_path))
    now = utcnow()
    with db.session() as session:
        study = Study(study_uid="1.2.3.4", state="reported", priority=2, calling_ae="STORESCU", first_received_at=now,
                      last_received_at=now, state_changed_at=now)
        session.add(study)
        session.flush()
        report = Report(study_id=study.id, sop_instance_uid="1.2.3.4.5", series_uid="1.2.3.4.6",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", rel_path=rel_path, findings="",
                        model_version="v", source_instances=1, created_at=now)
        session.add(report)
        session.flush()
        session.add(Export(report_id=report.id, destination="PACS", state=PENDING, attempts=0, next_attempt_at=now))
        return study.id


def test_a_failed_export_is_revived_after_its_wait_and_delivered_once(tmp_path):
    pacs_port = free_port()
    (tmp_path / "riha-node.toml").write_text(
        f'[node]\nstorage_dir = "storage"\nacse_timeout_s = 2\n[[pacs]]\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {pacs_port}\nmax_attempts = 1\nretry_failed_after_s = {RETRY_AFTER_S}\n")
    config = load_config(tmp_path / "riha-node.toml", environ={})
    db, store = open_node(config)
    study_id = reported_study(db, store)
    received = []
    try:
        assert export_due(db, store, config) == 0  # nobody listens: the only attempt fails
        with db.read() as session:
            assert session.get(Study, study_id).state == "export_failed"
        assert export_due(db, store, config) == 0, "not revived before retry_failed_after_s"

        pacs = AE(ae_title="PACS")
        pacs.supported_contexts = AllStoragePresentationContexts
        server = pacs.start_server(("127.0.0.1", pacs_port), block=False,
                                   evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(event) or 0x0000)])
        try:
            time.sleep(RETRY_AFTER_S)
            assert export_due(db, store, config) == 1
            assert export_due(db, store, config) == 0
        finally:
            server.shutdown()
        with db.read() as session:
            assert session.scalars(select(Export.state)).all() == [DELIVERED]
            path = session.scalars(select(StudyTransition.to_state).where(StudyTransition.study_id == study_id)
                                   .order_by(StudyTransition.id)).all()
        assert path == ["export_failed", "reported", "exported"]
        assert len(received) == 1
    finally:
        db.dispose()
