"""SCP behaviour under stress and failure: SIGTERM mid-transfer, association limit, TLS, a broken database, PHI."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from riha_node.storage import InstanceStore
from tests.node.peers import NodeProcess, dcmtk, dcmtk_env, in_process_scp
from tests.node.samples import SHARED_SC_JPEG, derive, real_file

pytestmark = pytest.mark.peer


def test_sigterm_lets_the_association_in_flight_finish_and_exits_0(tmp_path):
    node = NodeProcess(tmp_path / "node").start()
    study_uid = generate_uid()
    files = [derive(SHARED_SC_JPEG, tmp_path / "send" / f"{i:03}.dcm", study_uid=study_uid) for i in range(40)]
    sender = subprocess.Popen([dcmtk("storescu"), "-xy", "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1",
                               str(node.port), *map(str, files)], env=dcmtk_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node.wait_for(lambda: "instance stored" in node.log_text(), what="the first stored instance")
    assert node.stop() == 0
    _, errors = sender.communicate(timeout=60)
    assert sender.returncode == 0, f"the transfer in flight must complete: {errors}"
    node.start()
    try:
        assert node.status()["instances"] == len(files)
    finally:
        assert node.stop() == 0


def test_associations_beyond_the_limit_are_rejected_and_the_node_recovers(tmp_path):
    node = NodeProcess(tmp_path / "node")
    node.workdir.mkdir(parents=True)
    node.write_config()
    node.config_path.write_text(node.config_path.read_text().replace("[node]\n", "[node]\nmax_associations = 2\n"))
    node.start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", node.port, ae_title="RIHA") for _ in range(2)]
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", node.port, ae_title="RIHA")
        assert extra.is_rejected
        assert extra.acceptor.primitive.diagnostic == 0x02  # local limit exceeded
        for assoc in held:
            assoc.release()
        deadline = time.monotonic() + 10  # the released slots free as their threads end: soon, later under load
        while not (again := ae.associate("127.0.0.1", node.port, ae_title="RIHA")).is_established:
            assert time.monotonic() < deadline, "released associations never freed their slots"
            time.sleep(0.2)
        assert again.send_c_echo().Status == 0
        again.release()
    finally:
        assert node.stop() == 0


def test_database_that_cannot_be_written_gives_a700_and_leaves_no_file(tmp_path):
    """In-process so the test can break the database under a running SCP."""
    with in_process_scp(tmp_path) as server:
        with server.db.engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE instances RENAME TO instances_away")
        assert store_in_one_association(server.port, real_file("RG1_UNCR.dcm")) == 0xA700
        assert list((server.store.root / "studies").rglob("*.dcm")) == []
        assert list((server.store.root / "studies").rglob("*.partial")) == []


def store_in_one_association(port: int, path: Path) -> int | str:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="RIHA")
    if not assoc.is_established:
        answer = assoc.acceptor.primitive
        return f"rejected {answer.result:#x} {answer.result_source:#x} {answer.diagnostic:#x}"
    status = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()
    return status.Status


def test_over_the_watermark_new_associations_wait_and_open_ones_get_a700(tmp_path, monkeypatch):
    """The disk crosses the watermark while PACS holds an association: what it sends there is refused with 0xA700,
    a new association is rejected as transient (local limit exceeded), and both recover when the disk does."""
    with in_process_scp(tmp_path) as server:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        already_open = ae.associate("127.0.0.1", server.port, ae_title="RIHA")
        assert already_open.is_established
        monkeypatch.setattr(InstanceStore, "over_watermark", lambda self, percent, incoming_bytes=0: True)
        assert already_open.send_c_store(pydicom.dcmread(real_file("RG1_UNCR.dcm"))).Status == 0xA700
        already_open.release()
        assert store_in_one_association(server.port, real_file("RG1_UNCR.dcm")) == "rejected 0x2 0x3 0x2"
        assert list((server.store.root / "studies").rglob("*.dcm")) == []
        monkeypatch.undo()
        assert store_in_one_association(server.port, real_file("RG1_UNCR.dcm")) == 0x0000


def test_no_patient_identifiers_in_the_log(tmp_path):
    marked = derive(real_file("RG1_UNCR.dcm"), tmp_path / "marked.dcm", study_uid=generate_uid(),
                    PatientName="Doe^Jane^Q", PatientID="MRN-7734121", PatientBirthDate="19510203",
                    AccessionNumber="ACC-99231", BodyPartExamined="HAND")
    node = NodeProcess(tmp_path / "node").start()
    try:
        for path in (marked, real_file("RG1_UNCR.dcm")):
            result = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1",
                                     str(node.port), str(path)], env=dcmtk_env(), capture_output=True)
            assert result.returncode == 0
        node.wait_for(lambda: node.studies("queued"), what="a queued study")
    finally:
        assert node.stop() == 0
    log = node.log_text()
    assert "instance stored" in log
    real = pydicom.dcmread(real_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    for value in ("Doe", "Jane", "MRN-7734121", "19510203", "ACC-99231", str(real.PatientName),
                  str(real.PatientID), str(real.get("AccessionNumber", "")) or "no-accession",
                  str(real.get("PatientBirthDate", "")) or "no-birth-date"):
        assert value not in log, f"{value!r} leaked into the log"
