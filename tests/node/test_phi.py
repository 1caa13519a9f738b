"""A study with distinctive patient values goes round the whole loop; the node's log must hold none of them.

Ingest, a study that fails and is retried, a draft SR, an export that fails while PACS is down and is then
delivered: every path that logs. (The session-end scan in tests/conftest.py checks every other test's logs too.)
"""
from __future__ import annotations

import shutil
import sqlite3

import pydicom
import pytest
from pydicom.uid import generate_uid

from riha_model.phantoms import write_phantoms
from tests.conftest import KNOWN_PHI, REPO, phi_kinds_in, phi_patterns
from tests.node.peers import StorescpProcess, free_port
from tests.node.samples import derive
from tests.node.test_loop import loop_node, send

PATIENT = {"PatientName": "Zyxwv^Quentin^Marlowe", "PatientID": "PID-ZQ-90817263", "PatientBirthDate": "19330517",
           "AccessionNumber": "ACCZQ7781204"}


@pytest.mark.peer
@pytest.mark.slow
def test_the_whole_loop_logs_no_patient_value(tmp_path, phantom_checkpoint):
    assert all(value in sum(KNOWN_PHI.values(), []) for value in PATIENT.values()), "the session scan must know them"
    annotation = write_phantoms(tmp_path / "phantoms", 3, seed=5, dicom=True, image_size=64)
    frontal, lateral = sorted(sorted((annotation.parent / "dicom").iterdir())[0].glob("*.dcm"))
    good_uid, bad_uid = generate_uid(), generate_uid()
    good = [derive(path, tmp_path / "send" / f"good-{path.name}", study_uid=good_uid, **PATIENT)
            for path in (frontal, lateral)]
    pixels = pydicom.dcmread(frontal).pixel_array
    bad = derive(frontal, tmp_path / "send" / "bad.dcm", study_uid=bad_uid, **PATIENT,
                 PixelData=pixels[: pixels.shape[0] // 2].tobytes())  # half an image: stored, but not decodable

    pacs = StorescpProcess(tmp_path / "pacs", aet="PACS", port=free_port())  # down until the first export failed
    node = loop_node(tmp_path / "node", phantom_checkpoint, ("PACS", pacs.port)).start()
    try:
        send(node, *good, bad)
        node.wait_for(lambda: any(s["study_uid"] == bad_uid for s in node.studies("failed")), timeout=120,
                      what="the damaged study to fail")
        node.cli("retry", bad_uid)
        node.wait_for(lambda: node.log_text().count('"event": "study failed"') >= 2, timeout=60,
                      what="the retried study to fail again")
        node.wait_for(lambda: '"event": "export retried"' in node.log_text(), timeout=120,
                      what="an export attempt while PACS is down")
        pacs.start()
        node.wait_for(lambda: any(s["study_uid"] == good_uid for s in node.studies("exported")), timeout=60,
                      what="the draft to reach PACS")
    finally:
        pacs.stop()
        assert node.stop() == 0
    (delivered,) = pacs.received()
    assert str(pydicom.dcmread(delivered).PatientName) == PATIENT["PatientName"], "the values did travel the loop"

    log = node.log_text() + (node.workdir / "cli.log").read_text()
    for event in ("instance stored", "study failed", "study reported", "export retried", "draft delivered"):
        assert f'"event": "{event}"' in log, f"the loop never logged {event!r}"
    with sqlite3.connect(node.storage_dir / "riha-node.db") as database:
        (draft,) = [row[0] for row in database.execute("SELECT findings FROM reports")]
    patterns = phi_patterns({kind: set(values) for kind, values in KNOWN_PHI.items()} | {"report text": {draft}})
    assert not phi_kinds_in(log, patterns), f"the node logged {phi_kinds_in(log, patterns)}"


LEAKY_TESTS = '''
def test_a_node_log(tmp_path):
    (tmp_path / "serve.log").write_text('{"event": "instance stored", "note": "PHANTOM^CHEST00042"}')


def test_in_process():
    print('{"event": "study claimed", "note": "MRN-7734121"}')
'''


@pytest.mark.slow
def test_the_session_scan_fails_a_session_whose_logs_hold_patient_values(pytester, monkeypatch):
    pytester.makeconftest("from tests.conftest import pytest_runtest_logreport, pytest_sessionfinish  # noqa: F401")
    (pytester.path / "leaky" / "tests" / "node").mkdir(parents=True)
    (pytester.path / "leaky" / "tests" / "node" / "test_leaky.py").write_text(LEAKY_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the leaky session imports the real scan from tests.conftest
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    finally:  # its deliberate leak lies under this session's folder too: remove it before this session's scan
        for inner_session in pytester.path.glob("runpytest-*"):
            if inner_session.is_symlink():
                inner_session.unlink()
            else:
                shutil.rmtree(inner_session)
    output = result.stdout.str() + result.stderr.str()
    assert "2 passed" in output
    assert result.ret == pytest.ExitCode.TESTS_FAILED, "passing tests with leaky logs must fail the session"
    assert "serve.log: patient name" in output
    assert "test_leaky.py::test_in_process: patient ID" in output
    assert "PHANTOM^CHEST00042" not in output and "MRN-7734121" not in output, "the scan must not print the value"
