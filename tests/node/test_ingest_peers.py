"""A real `riha-node serve` against real peers: dcmtk echoscu/storescu, pynetdicom as a hostile sender, Orthanc."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, ComputedRadiographyImageStorage

from tests.node.peers import VENV_BIN, NodeProcess, OrthancProcess, StorescpProcess, dcmtk, dcmtk_env
from tests.node.samples import SHARED_SC_JPEG, dataset_sha256, derive, real_file

pytestmark = pytest.mark.peer


@pytest.fixture
def node(tmp_path):
    node = NodeProcess(tmp_path / "node").start()
    yield node
    if node.process is not None:
        assert node.stop() == 0, "serve must exit 0 on SIGTERM"


def storescu(node: NodeProcess, *files: Path, options: tuple[str, ...] = (), calling_ae: str = "STORESCU"):
    return subprocess.run([dcmtk("storescu"), *options, "-aet", calling_ae, "-aec", node.ae_title, "127.0.0.1",
                           str(node.port), *map(str, files)], capture_output=True, text=True, env=dcmtk_env(),
                          timeout=120)


def stored_files(node: NodeProcess) -> list[Path]:
    return sorted((node.storage_dir / "studies").rglob("*.dcm"))


def send_with_pynetdicom(node: NodeProcess, path: Path, sop_class: str = ComputedRadiographyImageStorage,
                         calling_ae: str = "TESTSCU", transfer_syntax: str = "1.2.840.10008.1.2.1") -> int:
    """Send a file's bytes as they are (no re-encoding), so damaged files really travel damaged."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, transfer_syntax)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return status.Status


def test_echo_from_dcmtk_and_rejection_of_unknown_titles(node):
    ok = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "RIHA", "127.0.0.1", str(node.port)],
                        capture_output=True, text=True, env=dcmtk_env())
    assert ok.returncode == 0, ok.stderr
    unknown = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "RIHA", "127.0.0.1", str(node.port)],
                             capture_output=True, text=True, env=dcmtk_env())
    assert unknown.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown.stderr
    wrong_called = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "NOTRIHA", "127.0.0.1",
                                   str(node.port)], capture_output=True, text=True, env=dcmtk_env())
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr


def test_peer_bound_to_a_host_is_rejected_from_another(tmp_path):
    node = NodeProcess(tmp_path / "node", peers=[("TESTSCU", "127.0.0.2")]).start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RIHA", bind_address=("127.0.0.1", 0))
        assert assoc.is_rejected
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RIHA", bind_address=("127.0.0.2", 0))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        assert node.stop() == 0


def test_real_chest_files_in_three_transfer_syntaxes_are_stored_as_sent_and_queued(node, tmp_path):
    """Each file goes to the node and to storescp in bit-preserving mode: both must hold the same data set bytes."""
    reference = StorescpProcess(tmp_path / "reference").start()
    files = {"RG1_UNCR": (real_file("RG1_UNCR.dcm"), ()),
             "RG1_J2KR": (real_file("RG1_J2KR.dcm"), ("-xv",)),
             "SIIM_JPEG": (SHARED_SC_JPEG, ("-xy",))}
    try:
        for name, (path, options) in files.items():
            for port, aec in ((node.port, node.ae_title), (reference.port, reference.aet)):
                result = subprocess.run([dcmtk("storescu"), *options, "-aet", "STORESCU", "-aec", aec, "127.0.0.1",
                                         str(port), str(path)], capture_output=True, text=True, env=dcmtk_env())
                assert result.returncode == 0, f"{name} to {aec}: {result.stderr}"
    finally:
        reference.stop()
    as_sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in reference.received()}
    stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in stored_files(node)}
    assert len(stored) == 3 and stored.keys() == as_sent.keys()
    for name, (path, _) in files.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        copy = stored[source.SOPInstanceUID]
        assert dataset_sha256(copy) == dataset_sha256(as_sent[source.SOPInstanceUID]), \
            f"{name} was not stored byte for byte"
        assert pydicom.dcmread(copy, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            source.file_meta.TransferSyntaxUID
    status = node.wait_for(lambda: (s := node.status())["studies"]["queued"] == 2 and s, what="two queued studies")
    assert status["instances"] == 3
    assert status["queue"]["queued"] == 2
    studies = {s["study_uid"]: s for s in node.studies()}
    assert studies[pydicom.dcmread(real_file("RG1_UNCR.dcm"), stop_before_pixels=True).StudyInstanceUID][
        "instances"] == 2


def test_bytes_sent_unchanged_are_stored_unchanged_including_trailing_padding(node):
    path = real_file("RG1_UNCR.dcm")
    assert send_with_pynetdicom(node, path) == 0x0000
    assert dataset_sha256(stored_files(node)[0]) == dataset_sha256(path)


def test_resending_an_instance_is_success_with_one_row_and_one_file(node):
    path = real_file("RG1_UNCR.dcm")
    for _ in range(2):
        assert storescu(node, path).returncode == 0
    assert len(stored_files(node)) == 1
    assert node.status()["instances"] == 1
    assert "instance already stored" in node.log_text()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_data_gets_a_failure_status_and_nothing_is_stored(node, tmp_path, damage):
    source = derive(SHARED_SC_JPEG, tmp_path / "good.dcm", SOPClassUID=ComputedRadiographyImageStorage)
    raw = source.read_bytes()
    damaged = tmp_path / f"{damage}.dcm"
    if damage == "truncated":
        damaged.write_bytes(raw[: len(raw) - 5000])
    else:
        meta_end = len(raw) - len(raw.split(b"\x08\x00\x05\x00", 1)[1]) - 4  # first element of the data set
        damaged.write_bytes(raw[:meta_end] + bytes(range(256)) * 40)
    status = send_with_pynetdicom(node, damaged, transfer_syntax="1.2.840.10008.1.2.4.50")
    assert 0xC000 <= status <= 0xCFFF
    assert stored_files(node) == []
    assert node.status()["instances"] == 0
    assert storescu(node, real_file("RG1_UNCR.dcm")).returncode == 0, "the node must keep serving"
    assert node.status()["instances"] == 1


def test_ct_and_non_chest_radiograph_are_acknowledged_and_their_studies_ignored(node, tmp_path):
    ct = derive(real_file("RG1_UNCR.dcm"), tmp_path / "ct.dcm", study_uid=generate_uid(), Modality="CT",
                SOPClassUID=CTImageStorage, BodyPartExamined="CHEST")
    hand = derive(real_file("RG1_UNCR.dcm"), tmp_path / "hand.dcm", study_uid=generate_uid(), BodyPartExamined="HAND")
    assert storescu(node, ct).returncode == 0
    assert storescu(node, hand).returncode == 0
    studies = node.wait_for(lambda: [s for s in node.studies("ignored")], what="ignored studies")
    reasons = sorted(s["reason"] for s in studies)
    assert len(reasons) == 2
    assert "body part HAND is not a chest" in reasons
    assert any("SOP class 1.2.840.10008.5.1.4.1.1.2 is not an accepted radiograph class" == r for r in reasons)
    assert len(stored_files(node)) == 2, "ignored instances are still stored"
    time.sleep(node.quiet_period_s + 1.5)
    assert node.status()["queue"]["queued"] == 0, "an ignored study is never queued"


def test_disk_over_the_watermark_pauses_new_associations_and_writes_nothing(tmp_path):
    node = NodeProcess(tmp_path / "node", extra_toml="").start()
    node.stop()
    node.config_path.write_text(node.config_path.read_text().replace(
        "[study]\n", "[study]\ndisk_watermark_percent = 0.001\n"))
    node.start()
    try:
        pushed = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "RIHA", "127.0.0.1", str(node.port),
                                 str(real_file("RG1_UNCR.dcm"))], capture_output=True, text=True, env=dcmtk_env(),
                                timeout=60)
        assert pushed.returncode != 0 and "Association Rejected" in pushed.stderr + pushed.stdout
        assert "Transient" in pushed.stderr + pushed.stdout, "PACS must be told to try again later"
        assert stored_files(node) == []
        assert not list((node.storage_dir / "studies").rglob("*.partial"))
        assert node.status()["instances"] == 0
    finally:
        assert node.stop() == 0


def test_kill_9_mid_transfer_loses_nothing_that_was_acknowledged(tmp_path):
    node = NodeProcess(tmp_path / "node", quiet_period_s=1.0).start()
    study_uid = generate_uid()
    files = [derive(SHARED_SC_JPEG, tmp_path / "send" / f"{i:03}.dcm", study_uid=study_uid) for i in range(60)]
    acknowledged: list[Path] = []
    failed_after_kill = threading.Event()

    def sender():
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID,
                                 "1.2.840.10008.1.2.4.50")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RIHA")
        for path in files:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(path)
            if getattr(status, "Status", None) == 0:
                acknowledged.append(path)
            time.sleep(0.01)
        if assoc.is_established:
            assoc.release()
        failed_after_kill.set()

    thread = threading.Thread(target=sender)
    thread.start()
    node.wait_for(lambda: len(acknowledged) >= 15, what="some acknowledged instances")
    node.kill()
    thread.join(timeout=60)
    assert 15 <= len(acknowledged) < len(files), "the kill must land mid-transfer"
    node.wait_for(lambda: subprocess.run(["pgrep", "-f", str(node.config_path)]).returncode == 1, timeout=60,
                  what="the killed node's worker process to stop by itself")
    node.start()
    try:
        on_disk = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in stored_files(node)}
        for path in acknowledged:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in on_disk, "an acknowledged instance is missing after kill -9"
            assert dataset_sha256(on_disk[uid]) == dataset_sha256(path)
        assert not list((node.storage_dir / "studies").rglob("*.partial")), "temp files survive a restart"
        rows = node.studies()
        assert len(rows) == 1 and rows[0]["instances"] >= len(acknowledged)
        assert storescu(node, *files, options=("-xy",)).returncode == 0, "the rest can be sent again"
        done = node.wait_for(lambda: node.studies("queued"), what="the interrupted study to be queued")
        assert done[0]["instances"] == len(files)
    finally:
        assert node.stop() == 0


def test_a_study_pushed_from_orthanc_arrives(tmp_path):
    node = NodeProcess(tmp_path / "node", peers=[("ORTHANC", "127.0.0.1")]).start()
    orthanc = OrthancProcess(tmp_path / "orthanc", modalities={"riha": ["RIHA", "127.0.0.1", node.port]}).start()
    try:
        uploaded = orthanc.rest("POST", "/instances", real_file("RG1_UNCR.dcm").read_bytes())
        orthanc.rest("POST", "/modalities/riha/store", {"Resources": [uploaded["ParentStudy"]], "Synchronous": True})
        rows = node.wait_for(lambda: node.studies("queued"), what="the Orthanc study to be queued")
        assert rows[0]["study_uid"] == pydicom.dcmread(real_file("RG1_UNCR.dcm")).StudyInstanceUID
        assert pydicom.dcmread(stored_files(node)[0]).PixelData == pydicom.dcmread(real_file("RG1_UNCR.dcm")).PixelData
    finally:
        orthanc.stop()
        assert node.stop() == 0


def test_status_and_cli_errors_are_one_clear_line(node, tmp_path):
    bad = node.cli("studies", "--state", "nonsense", check=False)
    assert bad.returncode != 0 and "nonsense" in bad.stderr
    missing = subprocess.run([str(VENV_BIN / "riha-node"), "status", "--config", str(tmp_path / "absent.toml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert "absent.toml does not exist" in missing.stderr and "Traceback" not in missing.stderr
    status = node.status()
    assert set(status) >= {"studies", "instances", "queue"}
    assert json.dumps(status)
