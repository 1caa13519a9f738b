"""Fixtures shared by the whole suite: where the real data is, and a small real model trained once per session."""
from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from riha_model.api import TrainResult, train_model
from riha_model.phantoms import write_phantoms

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """torch on one thread in the test process: on two shared cores a second thread made small operations many times
    slower (measured by bench/model.py and bench/e2e.py)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the real data set is expected at {SHARED_DATA} (see the README)"
    return SHARED_DATA


@dataclass(frozen=True)
class PhantomModel:
    annotation: Path  # the phantom studies it was trained on (annotation.json, images/ beside it)
    result: TrainResult
    cpu_seconds: float  # the training's CPU time in this process


@pytest.fixture(scope="session")
def phantom_model(tmp_path_factory) -> PhantomModel:
    """A real `tiny` checkpoint trained in this test session on phantom studies: small and quick, a model that
    writes text, for the tests of everything around the model (API, CLI, worker, SR, export)."""
    folder = tmp_path_factory.mktemp("phantom-model")
    annotation = write_phantoms(folder / "data", 32, seed=7, image_size=64)
    started = time.process_time()
    result = train_model(annotation, folder / "tiny.riha", preset="tiny", epochs=2, batch_size=8, seed=7,
                         device="cpu", config_overrides={"image_size": 64})
    return PhantomModel(annotation=annotation, result=result, cpu_seconds=time.process_time() - started)


@pytest.fixture(scope="session")
def phantom_checkpoint(phantom_model) -> Path:
    return phantom_model.result.checkpoint


# --- Session-end PHI scan: no patient name, ID, birth date, accession number or report text in any node log --------

pytest_plugins = ["pytester"]  # test_phi.py runs a leaky session to show the scan fails it

# Identifiers the tests put into data sets on purpose (test_phi.py pushes these through the whole loop).
KNOWN_PHI = {
    "patient name": ["Doe^Jane^Q", "Zyxwv^Quentin^Marlowe", "ZYXWV^QUENTIN"],
    "patient ID": ["MRN-7734121", "PID-ZQ-90817263"],
    "birth date": ["19510203", "19330517"],
    "accession number": ["ACC-99231", "ACCZQ7781204"],
}
# The phantom generator's identities (riha_model.phantoms): PHANTOM^CHEST00001, PHANTOM-7-00001, PH00700001.
PHANTOM_PHI = {
    "patient name": re.compile(r"PHANTOM\^CHEST\d{5}"),
    "patient ID": re.compile(r"PHANTOM-\d+-\d{5}"),
    "accession number": re.compile(r"\bPH\d{8}\b"),
}
# Node logs: every *.log under the session folder (NodeProcess: serve.log with its workers, cli.log; extra workers'
# logs), except the real peers' own logs, which record what those programs do with the data they hold.
PEER_LOGS = {"orthanc.log", "postgres.log"}
REAL_DICOM = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
MIN_SENTENCE = 24  # report sentences shorter than this are too generic to mean a leak


_IN_PROCESS_LOGS: list[tuple[str, str]] = []  # (test id, what it logged in this process)


def pytest_runtest_logreport(report):
    """Keep what node tests logged in this process (structlog, stdlib logging) for the session-end scan."""
    if "tests/node/" in report.nodeid.replace("\\", "/"):
        captured = "\n".join(content for _, content in report.sections)
        if captured:
            _IN_PROCESS_LOGS.append((report.nodeid, captured))


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a node log holds a known patient value; name the file and the kind, never the value."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or session.config.option.collectonly:
        return
    basetemp = factory.getbasetemp()
    patterns = phi_patterns(_known_phi(basetemp))
    sources = [(str(path), path.read_text(errors="replace")) for path in basetemp.rglob("*.log")
               if path.is_file() and path.name not in PEER_LOGS] + _IN_PROCESS_LOGS
    leaks = sorted({f"{where}: {kind}" for where, text in sources for kind in phi_kinds_in(text, patterns)})
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "PHI found in logs (file: kind of value):\n  " + "\n  ".join(leaks)
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _known_phi(basetemp: Path) -> dict[str, set[str]]:
    """The fixed values, the identities in the real DICOM seeds, and every report text this session produced."""
    needles = {kind: set(values) for kind, values in KNOWN_PHI.items()}
    sources = [Path(found) for name in REAL_DICOM if (found := get_testdata_file(name, download=False))]
    sources.append(SHARED_DATA / "dicom" / "siim_pneumothorax_cr_sc_jpeg.dcm")
    for path in filter(Path.exists, sources):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for kind, keyword in (("patient name", "PatientName"), ("patient ID", "PatientID"),
                              ("birth date", "PatientBirthDate"), ("accession number", "AccessionNumber")):
            if len(str(ds.get(keyword, "") or "")) >= 4:
                needles.setdefault(kind, set()).add(str(ds.get(keyword)))
    reports = needles.setdefault("report text", set())
    for annotation in basetemp.rglob("annotation.json"):  # phantom studies written by this session
        try:
            for split in json.loads(annotation.read_text()).values():
                for study in split:
                    reports |= sentences_of(study.get("report", ""))
        except (ValueError, AttributeError, TypeError):
            continue
    for database in basetemp.rglob("riha-node.db"):
        for text in _texts_in(database):  # a draft as a whole (tiny models write short ones) and sentence by sentence
            reports |= sentences_of(text) | ({text.strip()} if len(text.strip()) >= MIN_SENTENCE else set())
    return needles


def sentences_of(text: str) -> set[str]:
    return {s.strip() for s in re.split(r"(?<=[.!?])\s+", text or "") if len(s.strip()) >= MIN_SENTENCE}


def _texts_in(database: Path) -> list[str]:
    """Drafts and signed reports a node database of this session holds."""
    texts = []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            for query in ("SELECT findings FROM reports", "SELECT text FROM signed_reports"):
                try:
                    texts.extend(row[0] for row in connection.execute(query) if row[0])
                except sqlite3.Error:
                    continue
    except sqlite3.Error:
        pass
    return texts


def phi_patterns(needles: dict[str, set[str]]) -> list[tuple[str, re.Pattern]]:
    """One pattern per kind of value, each value as a whole token (a birth date inside a longer UID is none)."""
    patterns = [(kind, re.compile("|".join(rf"(?<!\w){re.escape(value)}(?!\w)" for value in sorted(values))))
                for kind, values in needles.items() if values]
    return patterns + list(PHANTOM_PHI.items())


def phi_kinds_in(text: str, patterns: list[tuple[str, re.Pattern]]) -> set[str]:
    return {kind for kind, pattern in patterns if pattern.search(text)}
