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

from riha_node.config import load_config
from riha_node.db import Database
from riha_node.scp import StorageServer
from riha_node.storage import InstanceStore
from riha_node.tls import client_context
from tests.node.peers import NodeProcess, dcmtk, dcmtk_env, free_port
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
        time.sleep(0.5)
        again = ae.associate("127.0.0.1", node.port, ae_title="RIHA")
        assert again.is_established and again.send_c_echo().Status == 0
        again.release()
    finally:
        assert node.stop() == 0


def make_pki(folder: Path) -> dict[str, Path]:
    """A site CA, a node certificate and a modality certificate signed by it, and an untrusted self-signed one."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=riha test site CA")
    for name in ("node", "modality"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2",
        "-subj", "/CN=rogue")
    return {name: folder / name for name in ("ca.crt", "node.crt", "node.key", "modality.crt", "modality.key",
                                             "rogue.crt", "rogue.key")}


def test_tls_with_client_certificates(tmp_path):
    pki = make_pki(tmp_path / "pki")
    node = NodeProcess(tmp_path / "node", extra_toml=(
        f'[tls]\nenabled = true\ncertificate = "{pki["node.crt"]}"\nprivate_key = "{pki["node.key"]}"\n'
        f'ca_certificates = "{pki["ca.crt"]}"\n')).start()
    try:
        def echo_with(cert: str | None) -> bool:
            tls = load_config(node.config_path, environ={}).tls.model_copy(update={
                "certificate": pki[f"{cert}.crt"] if cert else None,
                "private_key": pki[f"{cert}.key"] if cert else None})
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.network_timeout = 5
            assoc = ae.associate("127.0.0.1", node.port, ae_title="RIHA", tls_args=(client_context(tls), None))
            if not assoc.is_established:
                return False
            ok = assoc.send_c_echo().Status == 0
            assoc.release()
            return ok

        assert echo_with("modality")
        assert not echo_with("rogue"), "a certificate the site CA did not sign must be refused"
        assert not echo_with(None), "a client without a certificate must be refused"
        plain = AE(ae_title="TESTSCU")
        plain.add_requested_context(Verification)
        plain.acse_timeout = plain.network_timeout = 5
        assert not plain.associate("127.0.0.1", node.port, ae_title="RIHA").is_established
    finally:
        assert node.stop() == 0


def test_database_that_cannot_be_written_gives_a700_and_leaves_no_file(tmp_path):
    """In-process so the test can break the database under a running SCP."""
    (tmp_path / "riha-node.toml").write_text(
        f'[node]\nport = {free_port()}\nstorage_dir = "s"\n[[peers]]\nae_title = "TESTSCU"\n')
    config = load_config(tmp_path / "riha-node.toml", environ={})
    db = Database(config.database_url)
    db.upgrade()
    store = InstanceStore(config.node.storage_dir)
    store.prepare()
    server = StorageServer(config, db, store)
    server.start()
    try:
        with db.engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE instances RENAME TO instances_away")
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="RIHA")
        status = assoc.send_c_store(pydicom.dcmread(real_file("RG1_UNCR.dcm")))
        assoc.release()
        assert status.Status == 0xA700
        assert list((store.root / "studies").rglob("*.dcm")) == []
        assert list((store.root / "studies").rglob("*.partial")) == []
    finally:
        server.stop(grace_s=1)
        db.dispose()


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
