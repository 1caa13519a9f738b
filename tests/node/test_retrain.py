"""`riha-node retrain` on a node holding site studies with signed reports.

A `tiny` model trained on phantoms that never show a pleural effusion is the active model; the site's studies
include effusions. Fine-tuning on them (after a retrain killed midway and started again) must name effusions on
held-out site studies that the starting model misses, and be promoted with its evidence in the registry; a candidate
trained on reports shuffled across the training studies must be refused. Retraining follows the recipe that makes
the tiny model learn on phantoms: no augmentation, learning rate 1e-3, 64-pixel images.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import structlog
from sqlalchemy import select, update

from riha_model.api import PHANTOM_TRAINING, train_model
from riha_model.labeler import POSITIVE, label_report
from riha_model.phantoms import write_phantoms
from riha_node.assembly import close_quiet_studies
from riha_node.config import Config
from riha_node.db import Database
from riha_node.models import Job, ModelVersion, SignedReport, Study, TaskLock, utcnow
from riha_node.model_runtime import ModelHolder
from riha_node.registry import ACTIVE, REFUSED, RETIRED, ensure_configured
from riha_node.retrain import NotEnoughData, ScheduledRetrain, held_out, retrain, signed_studies
from riha_node.states import JobState
from riha_node.storage import InstanceStore
from tests.node.peers import open_node
from tests.node.test_registry import REPO, draft_queued_studies, ingest, node_config, sr_model_version

EFFUSION = "Pleural Effusion"
BASE_PHANTOMS, BASE_EPOCHS = 200, 8
SITE_EFFUSION, SITE_OTHER = 40, 40
RETRAIN = '[retrain]\nepochs = 24\nlr = 1e-3\nbatch_size = 8\nmin_studies = 40\nval_fraction = 0.3\nmargin = 0\n'
SHUFFLED_EPOCHS = 8  # enough to undo what the images taught; kept short for the CPU budget
NODE_KEY = bytes(range(32))  # a fixed node secret: the same patients are held out in every test run

pytestmark = pytest.mark.timeout(1800)  # the first test trains the base model and runs a whole retrain: minutes of CPU


@pytest.fixture(scope="session")
def effusion_free_model(tmp_path_factory) -> Path:
    """A tiny model trained with PHANTOM_TRAINING on phantoms without a single pleural effusion (the effusion studies
    of a phantom set taken out; val and test together validate)."""
    folder = tmp_path_factory.mktemp("effusion-free")
    annotation = json.loads(write_phantoms(folder, BASE_PHANTOMS, seed=41, image_size=64).read_text())
    rows = [{"id": entry["id"], "report": entry["report"], "split": "train" if split == "train" else "val",
             "images": [str(folder / "images" / path) for path in entry["image_path"]]}
            for split in ("train", "val", "test") for entry in annotation[split]
            if "pleural_effusion" not in entry["findings"]]
    manifest = folder / "effusion-free.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {**PHANTOM_TRAINING, "epochs": BASE_EPOCHS, "batch_size": 8}
    return train_model(manifest, folder / "base.riha", validate_every=BASE_EPOCHS, dataset="iu_xray", seed=0,
                       device="cpu", **recipe).checkpoint


@pytest.fixture(scope="module")
def site_studies(tmp_path_factory) -> list[tuple[list[Path], str]]:
    """Phantom CR studies as DICOM with their reports: half show an effusion; every third patient had two studies."""
    folder = tmp_path_factory.mktemp("site")
    annotation = json.loads(write_phantoms(folder, 280, seed=42, dicom=True, image_size=64).read_text())
    entries = sorted((entry for split in annotation.values() for entry in split), key=lambda entry: entry["id"])
    chosen = ([e for e in entries if "pleural_effusion" in e["findings"]][:SITE_EFFUSION]
              + [e for e in entries if "pleural_effusion" not in e["findings"]][:SITE_OTHER])
    studies = []
    for number, entry in enumerate(chosen):
        files = sorted((folder / "dicom" / entry["id"]).glob("*.dcm"))
        for path in files:  # study 3k+1 belongs to study 3k's patient
            ds = pydicom.dcmread(path)
            ds.PatientID = f"SITE-{number - 1 if number % 3 == 1 else number}"
            ds.save_as(path, enforce_file_format=True)
        studies.append((files, entry["report"]))
    return studies


def site_node(folder: Path, checkpoint: Path, studies: list[tuple[list[Path], str]]) -> tuple[Config, Database]:
    """A node holding the studies, each with its signed report, none waiting for a worker."""
    folder.mkdir(parents=True, exist_ok=True)
    config = node_config(folder, checkpoint, RETRAIN)
    db, store = open_node(config)
    ensure_configured(db, config)
    (config.node.storage_dir / "node.key").write_bytes(NODE_KEY)
    for files, report in studies:
        study_uid = ingest(db, store, files)
        with db.session() as session:
            study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
            session.add(SignedReport(study_id=study.id, study_uid=study_uid, findings=report, text=report,
                                     source="import", source_ref=f"test:{study_uid}", received_at=utcnow()))
    close_quiet_studies(db, 0.0)
    with db.session() as session:  # drafted long ago, as far as this test cares
        session.execute(update(Job).values(state=JobState.DONE.value, finished_at=utcnow()))
    return config, db


def versions(db: Database) -> dict[str, ModelVersion]:
    with db.read() as session:
        return {row.version: row for row in session.scalars(select(ModelVersion))}


def effusion_f1(scores: dict) -> float:
    return scores["clinical_efficacy"]["per_observation_f1"][EFFUSION]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, effusion_free_model, site_studies):
    """A retrain killed with SIGKILL after its first epoch, what it left behind, and the retrain started again."""
    config, db = site_node(tmp_path_factory.mktemp("adapt"), effusion_free_model, site_studies)
    [base] = versions(db).values()
    log = (config.source.parent / "killed-retrain.log").open("w")  # the session's PHI scan reads it
    process = subprocess.Popen([sys.executable, "-m", "riha_node.cli", "retrain", "--config", str(config.source)],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ | {"RIHA_NODE_LOGGING_FORMAT": "json"})
    runs = config.node.storage_dir / "retrain"
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/candidate.riha.train-state")):
        assert process.poll() is None and time.monotonic() < deadline, "the retrain never finished an epoch"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    with db.read() as session:
        left = {"versions": versions(db), "lock": session.get(TaskLock, "retrain"), "pid": process.pid,
                "manifest": [json.loads(line) for line in next(runs.glob("*/dataset.jsonl")).read_text().splitlines()],
                "patients": dict(session.execute(select(Study.study_uid, Study.patient_key)).all())}
    with structlog.testing.capture_logs() as logs:
        outcome = retrain(config)
    return config, db, base, left, logs, outcome


@pytest.mark.slow
def test_killed_retrain_leaves_the_active_model_untouched(adapted):
    _, _, base, left, _, _ = adapted
    assert list(left["versions"]) == [base.version] and left["versions"][base.version].state == ACTIVE
    assert left["lock"].owner == f"{os.uname().nodename}:{left['pid']}"  # left behind, freed by the next run


@pytest.mark.slow
def test_split_keeps_each_patient_on_one_side(adapted):
    _, _, _, left, _, _ = adapted
    sides: dict[str, set] = {}
    for entry in left["manifest"]:
        sides.setdefault(left["patients"][entry["id"]], set()).add(entry["split"])
    assert all(len(split) == 1 for split in sides.values())
    assert any(len([e for e in left["manifest"] if left["patients"][e["id"]] == p]) == 2 for p in sides)
    assert {"train", "val"} == {entry["split"] for entry in left["manifest"]}


@pytest.mark.slow
def test_retrain_started_again_resumes_adapts_and_is_promoted(adapted):
    config, db, base, _, logs, outcome = adapted
    assert any(event["event"] == "training" and event.get("resumed") is True for event in logs)
    assert outcome.promoted, outcome.reason
    candidate_f1, active_f1 = effusion_f1(outcome.candidate_scores), effusion_f1(outcome.active_scores)
    print(f"held-out {outcome.counts}: effusion F1 {candidate_f1:.3f} vs {active_f1:.3f}; micro F1 "
          f"{outcome.candidate_scores['clinical_efficacy']['micro_f1']:.3f} vs "
          f"{outcome.active_scores['clinical_efficacy']['micro_f1']:.3f}")
    assert active_f1 == 0.0  # the starting model never names an effusion
    assert candidate_f1 > 0.3

    rows = versions(db)
    new = rows[outcome.candidate_version]
    assert (new.state, new.promoted_by, new.parent_sha256) == (ACTIVE, "retrain", base.sha256)
    assert rows[base.version].state == RETIRED
    metrics = json.loads(new.metrics)
    assert effusion_f1(metrics["held_out"]) == candidate_f1
    assert metrics["active_on_held_out"]["version"] == base.version
    assert json.loads(new.data_counts)["val"] == outcome.counts["val"] > 0
    assert not (config.node.storage_dir / "retrain").exists() or not any((config.node.storage_dir / "retrain")
                                                                        .iterdir())
    with db.read() as session:
        assert session.get(TaskLock, "retrain") is None

    assert ModelHolder(config, db).current().version == new.version


@pytest.mark.slow
def test_a_worker_drafts_with_the_promoted_version(adapted, tmp_path):
    config, db, _, _, _, outcome = adapted
    write_phantoms(tmp_path, 3, seed=43, dicom=True, image_size=64)
    store = InstanceStore(config.node.storage_dir)
    with db.read() as session:
        before = len(session.scalars(select(Job.id)).all())
    ingest(db, store, sorted(next((tmp_path / "dicom").iterdir()).glob("*.dcm")))
    [report] = draft_queued_studies(config, db, expected=1)
    assert report.model_version == outcome.candidate_version == sr_model_version(store, report)
    with db.read() as session:
        assert len(session.scalars(select(Job.id)).all()) == before + 1


@pytest.mark.slow
def test_gate_refuses_a_candidate_trained_on_shuffled_reports(adapted):
    """The training studies' reports are shuffled across them so that each study gets the report of a study with the
    other effusion status (a uniform shuffle is not enough here: with half the studies showing an effusion, a model
    that names effusions at random scores nearly as well as one that reads them). Held-out reports stay true."""
    config, db, _, _, _, outcome = adapted
    with db.session() as session:
        training = sorted(((study, report) for study, report in session.execute(
            select(Study, SignedReport).join(SignedReport, SignedReport.study_id == Study.id))
            if not held_out(study.patient_key or study.study_uid, config.retrain.val_fraction)),
            key=lambda pair: label_report(pair[1].text)[EFFUSION] != POSITIVE)
        positives = sum(label_report(report.text)[EFFUSION] == POSITIVE for _, report in training)
        texts = [report.text for _, report in training]
        texts = texts[positives:] + texts[:positives]
        for (study, _), text in zip(training, texts):  # newer signed reports: they become the ground truth
            session.add(SignedReport(study_id=study.id, study_uid=study.study_uid, text=text, source="import",
                                     source_ref=f"shuffled:{study.study_uid}", received_at=utcnow()))
    refused = retrain(config.model_copy(update={"retrain": config.retrain.model_copy(
        update={"epochs": SHUFFLED_EPOCHS})}))
    print(f"shuffled: {refused.reason}")
    assert not refused.promoted and refused.reason.startswith("refused: held-out micro_f1")
    rows = versions(db)
    assert rows[refused.candidate_version].state == REFUSED
    assert rows[outcome.candidate_version].state == ACTIVE  # the adapted model stays
    assert refused.active_version == outcome.candidate_version


def test_too_few_signed_studies_is_one_clear_error_and_changes_nothing(tmp_path, phantom_checkpoint):
    config = node_config(tmp_path, phantom_checkpoint, RETRAIN)
    with pytest.raises(NotEnoughData, match="Only 0 studies have images and a signed report; \\[retrain\\] "
                                            "min_studies is 40"):
        retrain(config)
    db = Database(config.database_url)
    assert [row.state for row in versions(db).values()] == [ACTIVE]
    with db.read() as session:
        assert session.get(TaskLock, "retrain") is None


@pytest.mark.slow
def test_scheduled_job_runs_retrain_as_a_subprocess_once_at_a_time(tmp_path, phantom_checkpoint):
    config = node_config(tmp_path, phantom_checkpoint, RETRAIN + 'schedule = "0 2 * * sun"\n')
    job = ScheduledRetrain(config)
    job()
    first = job.process
    job()  # still running: no second one
    assert job.process is first
    first.wait(timeout=120)
    assert first.returncode == 2  # NotEnoughData: a one-line user error


def test_dataset_takes_each_studys_newest_signed_report_and_skips_unusable_studies(tmp_path, phantom_checkpoint):
    folder = tmp_path / "phantoms"
    write_phantoms(folder, 5, seed=44, dicom=True, image_size=64)
    config = node_config(tmp_path, phantom_checkpoint)
    db, store = open_node(config)
    uids = [ingest(db, store, sorted(study.glob("*.dcm"))) for study in sorted((folder / "dicom").iterdir())]
    close_quiet_studies(db, 0.0)
    states = ["queued", "failed", "ignored", "exported", "queued"]
    with db.session() as session:
        for uid, state in zip(uids, states):
            session.execute(update(Study).where(Study.study_uid == uid).values(state=state))
        ids = dict(session.execute(select(Study.study_uid, Study.id)).all())
        for number, uid in enumerate(uids[:4]):  # the last study has no signed report
            session.add(SignedReport(study_id=ids[uid], study_uid=uid, text=f"older {number}", source="import",
                                     source_ref=f"a:{uid}", signed_at=utcnow() - timedelta(days=1),
                                     received_at=utcnow()))
        session.add(SignedReport(study_id=ids[uids[0]], study_uid=uids[0], text="newer", source="sr",
                                 source_ref=f"b:{uids[0]}", signed_at=utcnow(), received_at=utcnow()))
    chosen = {study.study_uid: study.text for study in signed_studies(db)}
    assert chosen == {uids[0]: "newer", uids[3]: "older 3"}
