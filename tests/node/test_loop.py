"""The whole loop with real peers: PACS pushes a study, the node drafts it, the SR comes back to PACS."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from riha_model.phantoms import write_phantoms
from tests.node.peers import VENV_BIN, NodeProcess, OrthancProcess, StorescpProcess, dcmtk, dcmtk_env
from tests.node.samples import derive, real_file

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def phantom_dicom(tmp_path_factory) -> Path:
    """Phantom CR studies as DICOM: dicom/<id>/0.dcm (frontal) and 1.dcm (lateral)."""
    folder = tmp_path_factory.mktemp("phantom-dicom")
    write_phantoms(folder, 4, seed=3, dicom=True, image_size=128)
    return folder / "dicom"


def loop_node(workdir: Path, checkpoint: Path, pacs: tuple[str, int], extra: str = "", processes: int = 1,
              peers=None) -> NodeProcess:
    ae, port = pacs
    return NodeProcess(workdir, quiet_period_s=1.0, peers=peers or [("STORESCU", "127.0.0.1"), ("TESTSCU", None)],
                       extra_toml=(f'[pacs]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
                                   f'backoff_s = 0.5\nbackoff_max_s = 2\nmax_attempts = 30\n\n'
                                   f'[worker]\ndevice = "cpu"\nprocesses = {processes}\nlease_s = 3\n'
                                   f'retry_backoff_s = 1\n\n[model]\ncheckpoint = "{checkpoint}"\n' + extra))


@pytest.fixture
def start_loop(tmp_path, phantom_checkpoint):
    """Start a storescp standing in for PACS (AE "PACS") and a node exporting to it; both stopped afterwards."""
    started: list[tuple[StorescpProcess, NodeProcess]] = []

    def start(processes: int = 1, receiver_running: bool = True) -> tuple[StorescpProcess, NodeProcess]:
        receiver = StorescpProcess(tmp_path / "received", aet="PACS")
        if receiver_running:
            receiver.start()
        node = loop_node(tmp_path / "node", phantom_checkpoint, ("PACS", receiver.port), processes=processes)
        started.append((receiver, node.start()))
        return started[-1]

    yield start
    for receiver, node in started:
        receiver.stop()
        assert node.stop() == 0


def first_study(phantom_dicom: Path) -> list[Path]:
    """The frontal and lateral files of the first phantom study."""
    return sorted(sorted(phantom_dicom.iterdir())[0].glob("*.dcm"))


def send(node: NodeProcess, *files: Path) -> None:
    result = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1",
                             str(node.port), *map(str, files)], capture_output=True, text=True, env=dcmtk_env())
    assert result.returncode == 0, result.stderr


def content_texts(sr: pydicom.Dataset) -> list[str]:
    texts = []
    for item in sr.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            texts.append(str(item.TextValue))
        texts.extend(content_texts(item))
    return texts


def evidence_uids(sr: pydicom.Dataset) -> set[str]:
    return {instance.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for instance in series.ReferencedSOPSequence}


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_orthanc_pushes_a_study_and_stores_the_draft_sr(tmp_path, phantom_checkpoint, phantom_dicom):
    orthanc = OrthancProcess(tmp_path / "orthanc")
    node = loop_node(tmp_path / "node", phantom_checkpoint, (orthanc.aet, orthanc.dicom_port),
                     peers=[("ORTHANC", "127.0.0.1")])
    orthanc.modalities = {"riha": [node.ae_title, "127.0.0.1", node.port]}
    orthanc.start()
    node.start()
    try:
        studies = {}
        for files in (first_study(phantom_dicom), [real_file("RG1_UNCR.dcm")]):
            for path in files:
                uploaded = orthanc.rest("POST", "/instances", path.read_bytes())
            orthanc.rest("POST", "/modalities/riha/store", {"Resources": [uploaded["ParentStudy"]],
                                                            "Synchronous": True})
            studies[uploaded["ParentStudy"]] = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                                                for p in files}

        def srs_in(study_id):
            instances = orthanc.rest("GET", f"/studies/{study_id}/instances?expand")
            return [i for i in instances if i["MainDicomTags"].get("SOPInstanceUID")
                    and orthanc.rest("GET", f"/instances/{i['ID']}/simplified-tags").get("Modality") == "SR"]

        node.wait_for(lambda: all(srs_in(s) for s in studies), timeout=180, what="an SR in every Orthanc study")
        for study_id, source_uids in studies.items():
            (sr_instance,) = srs_in(study_id)
            path = tmp_path / f"{sr_instance['ID']}.dcm"
            path.write_bytes(orthanc.rest_bytes("GET", f"/instances/{sr_instance['ID']}/file"))
            sr = pydicom.dcmread(path)
            assert evidence_uids(sr) == source_uids
            assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
            assert any(text.strip() for text in content_texts(sr)), "the draft has no findings text"
            assert dciodvfy_errors(path) == []
        assert {s["state"] for s in node.studies()} == {"exported"}
    finally:
        orthanc.stop()
        assert node.stop() == 0


def test_export_retries_with_backoff_until_the_receiver_starts_and_delivers_once(start_loop, phantom_dicom):
    receiver, node = start_loop(receiver_running=False)
    send(node, *first_study(phantom_dicom))
    node.wait_for(lambda: node.log_text().count('"event": "export retried"') >= 2, timeout=120,
                  what="export retries while the receiver is down")
    assert node.studies()[0]["state"] == "reported"
    receiver.start()
    node.wait_for(lambda: node.studies("exported"), timeout=60, what="delivery after the receiver started")
    time.sleep(3)
    assert len(receiver.received()) == 1, "exactly one copy of the draft must arrive"
    delays = [json.loads(line)["delay_s"] for line in node.log_text().splitlines()
              if '"event": "export retried"' in line]
    assert delays[:3] == sorted(delays[:3]) and delays[1] == 2 * delays[0], "backoff must grow"


def test_a_killed_worker_loses_its_lease_and_another_worker_reports_the_study_once(start_loop, phantom_dicom):
    receiver, node = start_loop(processes=0)
    worker_command = [str(VENV_BIN / "riha-node"), "worker", "--config", str(node.config_path)]
    first = subprocess.Popen(worker_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    send(node, *first_study(phantom_dicom))
    claimed = ""
    deadline = time.monotonic() + 120
    while '"event": "study claimed"' not in claimed and time.monotonic() < deadline:
        claimed += first.stdout.readline()
    first.send_signal(signal.SIGKILL)
    rest, _ = first.communicate(timeout=10)
    (node.workdir / "killed-worker.log").write_text(claimed + rest)  # the session's PHI scan reads it
    assert '"event": "study claimed"' in claimed and '"event": "study reported"' not in claimed + rest
    assert node.studies()[0]["state"] == "processing"
    with (node.workdir / "second-worker.log").open("w") as log:  # the session's PHI scan reads it
        second = subprocess.Popen(worker_command, stdout=log, stderr=subprocess.STDOUT)
        try:
            node.wait_for(lambda: node.studies("exported"), timeout=120, what="the second worker's report")
        finally:
            second.terminate()
            second.wait(timeout=60)
    time.sleep(2)
    assert len(receiver.received()) == 1
    assert node.status()["queue"].get("done") == 1


def test_late_instance_after_export_gives_a_second_sr_naming_its_predecessor(start_loop, phantom_dicom):
    receiver, node = start_loop()
    frontal, lateral = first_study(phantom_dicom)
    send(node, frontal)
    node.wait_for(lambda: node.studies("exported"), timeout=120, what="the first draft")
    send(node, lateral)
    node.wait_for(lambda: len(receiver.received()) == 2 and node.studies("exported"), timeout=120,
                  what="the second draft")
    first, second = sorted((pydicom.dcmread(p) for p in receiver.received()), key=lambda d: d.InstanceNumber)
    assert second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID and second.InstanceNumber == 2
    assert len(evidence_uids(second)) == 2


def test_a_study_with_nothing_the_model_can_read_fails_with_the_reason_and_can_be_retried(start_loop, tmp_path):
    _, node = start_loop()
    broken = derive(real_file("RG1_J2KR.dcm"), tmp_path / "broken.dcm", study_uid=generate_uid(),
                    PixelData=encapsulate([bytes(range(256)) * 64]))  # well framed, but not a JPEG 2000 stream
    result = subprocess.run([dcmtk("storescu"), "-xv", "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1",
                             str(node.port), str(broken)], capture_output=True, text=True, env=dcmtk_env())
    assert result.returncode == 0, result.stderr
    failed = node.wait_for(lambda: node.studies("failed"), timeout=120, what="the study to fail")
    assert failed[0]["reason"].startswith("no usable image")
    retried = node.cli("retry", failed[0]["study_uid"])
    assert "queued again" in retried.stdout
    node.wait_for(lambda: node.studies("failed"), timeout=120, what="the study to fail again")
    unknown = node.cli("retry", "1.2.3.4", check=False)
    assert unknown.returncode == 2 and "No study with StudyInstanceUID 1.2.3.4" in unknown.stderr
