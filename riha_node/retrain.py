"""`riha-node retrain`: fine-tune the active model on the site's signed reports, and promote it only if it is no worse.

1. Dataset: every study with a readable chest image and a signed report (its newest), not receiving, failed or
   ignored. Images go through `prepare_study`, the worker's own choice and decoding of views, and are written as
   16-bit PNG, so training sees what drafting sees.
2. Split by patient: a patient (studies.patient_key, a keyed hash) is held out when the hash's fraction is below
   `val_fraction`. The rule depends on the patient alone, so a patient held out once stays held out in every later
   retrain, and the active model (trained earlier) is never scored on studies it trained on.
3. Fine-tune the active checkpoint (`train_model(init=...)`) with the [retrain] schedule in a run folder named by a
   fingerprint of the active model, the data and the settings; the candidate is the last epoch. A run killed midway
   continues from its last saved training state (`train_model(resume=...)`) when started again on the same data.
4. Evaluate candidate and active on the same held-out studies; promote the candidate unless the configured metric is
   worse than the active's by more than `margin` (a tie on it is broken by BLEU-4); else mark it refused, with why.

At most one retrain runs at a time: a `task_locks` row held by host:pid, renewed by a heartbeat, free once it
expires or at once when its holder on this host is gone (kill -9 included). The active model is changed only by the
final promotion, in one transaction.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from riha_model.api import evaluate_model, train_model, training_state_path
from riha_node.config import Config, RetrainConfig
from riha_node.db import Database
from riha_node.errors import UserError
from riha_node.ground_truth import ground_truth_by_study
from riha_node.log import get_logger
from riha_node.models import Instance, Study, TaskLock, utcnow
from riha_node.preprocess import NoUsableImage, prepare_study
from riha_node.registry import (ACTIVE, CANDIDATE, REFUSED, ActiveVersion, activate, active_version,
                                ensure_configured, register)
from riha_node.states import StudyState
from riha_node.storage import InstanceStore

log = get_logger(__name__)

LOCK_NAME = "retrain"
RUNS_DIR = "retrain"
EXCLUDED_STATES = (StudyState.RECEIVING.value, StudyState.FAILED.value, StudyState.IGNORED.value)
VIEW_NAMES = ("frontal", "lateral", "other")  # riha_model's view ids 0, 1, 2
TIE = 1e-9


class RetrainBusy(UserError):
    """Another retrain holds the lock."""


class RetrainFailed(UserError):
    """Training stopped with an error; the active model is untouched and the run can continue."""


class NotEnoughData(UserError):
    """Too few usable studies, or an empty side of the split; the message says how many and what is needed."""


# ----------------------------------------------------------------------------------------------- the lock

class RetrainLock:
    """The `retrain` task lock, held for the `with` block and renewed every third of its timeout."""

    def __init__(self, db: Database, timeout_s: float, name: str = LOCK_NAME):
        self.db = db
        self.name = name
        self.timeout = timedelta(seconds=timeout_s)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> "RetrainLock":
        try:
            with self.db.session() as session:
                held = session.get(TaskLock, self.name, with_for_update=True)
                now = utcnow()
                if held is not None and held.expires_at > now and not _holder_gone(held.owner):
                    raise RetrainBusy(f"Another retrain ({held.owner}, started {held.acquired_at:%Y-%m-%d %H:%M} UTC) "
                                      f"is running; wait for it to finish (its lock expires at "
                                      f"{held.expires_at:%H:%M:%S} UTC if it stopped without releasing it).")
                if held is None:
                    session.add(TaskLock(name=self.name, owner=self.owner, acquired_at=now,
                                         expires_at=now + self.timeout))
                else:
                    if held.owner != self.owner:
                        log.warning("stale retrain lock taken over", previous_owner=held.owner)
                    held.owner, held.acquired_at, held.expires_at = self.owner, now, now + self.timeout
        except IntegrityError:  # another retrain inserted the row between our read and our write
            raise RetrainBusy("Another retrain started at the same moment; wait for it to finish.") from None
        self._heartbeat = threading.Thread(target=self._renew, name="retrain-lock", daemon=True)
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout.total_seconds() / 3):
            with self.db.session() as session:
                held = session.get(TaskLock, self.name)
                if held is None or held.owner != self.owner:
                    log.warning("retrain lock lost", owner=self.owner)
                    return
                held.expires_at = utcnow() + self.timeout

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with self.db.session() as session:
            session.execute(delete(TaskLock).where(TaskLock.name == self.name, TaskLock.owner == self.owner))


def _holder_gone(owner: str) -> bool:
    """True when the lock's holder ran on this host and its process no longer exists."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ----------------------------------------------------------------------------------------------- the dataset

@dataclass(frozen=True)
class SiteStudy:
    """A study the site signed: its images (from the store) and the newest signed report's text."""

    study_id: int
    study_uid: str
    patient: str  # patient_key, or the study UID when the study named no patient
    signed_report_id: int
    text: str


def signed_studies(db: Database) -> list[SiteStudy]:
    """Studies with a usable-looking image and a signed report with text, not receiving, failed or ignored, each
    with its ground truth (the newest signed report)."""
    with db.read() as session:
        truth = ground_truth_by_study(session)
        rows = session.execute(
            select(Study.id, Study.study_uid, Study.patient_key).order_by(Study.id)
            .where(Study.id.in_(list(truth)), Study.state.not_in(EXCLUDED_STATES),
                   select(Instance.id).where(Instance.study_id == Study.id, Instance.ignored_reason.is_(None))
                   .exists())).all()
    return [SiteStudy(study_id=row.id, study_uid=row.study_uid, patient=row.patient_key or row.study_uid,
                      signed_report_id=truth[row.id].id, text=truth[row.id].text)
            for row in rows if truth[row.id].text]


def held_out(patient: str, val_fraction: float) -> bool:
    """Whether this patient's studies are held out: a fixed function of the patient, never of the other data."""
    fraction = int(hashlib.sha256(patient.encode()).hexdigest()[:16], 16) / 16 ** 16
    return fraction < val_fraction


@dataclass
class SiteDataset:
    manifest: Path
    counts: dict = field(default_factory=dict)


def write_dataset(folder: Path, store: InstanceStore, db: Database, studies: list[SiteStudy],
                  settings: RetrainConfig) -> SiteDataset:
    """The JSONL manifest riha_model reads, with each study's prepared images as 16-bit PNG."""
    entries, skipped = [], 0
    patients = {"train": set(), "val": set()}
    bar = tqdm(studies, desc="preparing studies", unit="study", leave=False, disable=not sys.stderr.isatty())
    for study in bar:
        with db.read() as session:
            instances = list(session.scalars(select(Instance).where(Instance.study_id == study.study_id)
                                             .order_by(Instance.id)))
        try:
            prepared = prepare_study(store, instances)
        except NoUsableImage:
            skipped += 1
            continue
        images = []
        for number, image in enumerate(prepared.images):
            name = f"images/{study.study_uid}/{number}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(folder / name)
            images.append(name)
        split = "val" if held_out(study.patient, settings.val_fraction) else "train"
        patients[split].add(study.patient)
        entries.append({"id": study.study_uid, "images": images, "report": study.text, "split": split,
                        "views": [VIEW_NAMES[view] for view in prepared.view_ids]})
    counts = {"train": sum(entry["split"] == "train" for entry in entries),
              "val": sum(entry["split"] == "val" for entry in entries),
              "train_patients": len(patients["train"]), "val_patients": len(patients["val"]), "skipped": skipped}
    if counts["train"] + counts["val"] < settings.min_studies:
        raise NotEnoughData(f"Only {counts['train'] + counts['val']} studies have a readable image and a signed "
                            f"report ({skipped} more had no readable image); [retrain] min_studies is "
                            f"{settings.min_studies}. Import more signed reports or lower min_studies.")
    if not counts["train"] or not counts["val"]:
        raise NotEnoughData(f"The split by patient left {counts['train']} training and {counts['val']} held-out "
                            f"studies; both need some. Add studies or change [retrain] val_fraction.")
    manifest = folder / "dataset.jsonl"
    manifest.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")
    return SiteDataset(manifest=manifest, counts=counts)


def run_fingerprint(active: ActiveVersion, studies: list[SiteStudy], settings: RetrainConfig) -> str:
    """Names the run folder: the same active model, signed reports and settings continue the same run."""
    digest = hashlib.sha256(active.sha256.encode())
    digest.update(json.dumps([(s.study_uid, s.signed_report_id) for s in studies]).encode())
    digest.update(settings.model_dump_json(include={"epochs", "lr", "batch_size", "augment", "val_fraction"}).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- the gate

def metric_value(scores: dict, metric: str) -> float:
    return float(scores["BLEU_4"] if metric == "BLEU_4" else scores["clinical_efficacy"][metric])


def judge(candidate: dict, active: dict, metric: str, margin: float) -> tuple[bool, str]:
    """Promote unless the metric is worse than the active's by more than `margin`; a tie goes to BLEU-4."""
    new, old = metric_value(candidate, metric), metric_value(active, metric)
    comparison = f"held-out {metric} {new:.4f} vs {old:.4f} for the active model (margin {margin:g})"
    if new < old - margin - TIE:
        return False, f"refused: {comparison}"
    if abs(new - old) <= TIE and metric != "BLEU_4":
        new_bleu, old_bleu = metric_value(candidate, "BLEU_4"), metric_value(active, "BLEU_4")
        comparison += f"; tied, BLEU_4 {new_bleu:.4f} vs {old_bleu:.4f}"
        if new_bleu < old_bleu - margin - TIE:
            return False, f"refused: {comparison}"
    return True, f"promoted: {comparison}"


# ----------------------------------------------------------------------------------------------- the run

@dataclass(frozen=True)
class RetrainOutcome:
    promoted: bool
    candidate_version: str
    active_version: str  # the active model after the retrain
    reason: str
    candidate_scores: dict
    active_scores: dict
    counts: dict


class _ToStructlog(logging.Handler):
    """riha_model's epoch lines (stdlib logging) as structured log lines."""

    def emit(self, record: logging.LogRecord) -> None:
        log.info("training", detail=record.getMessage())


def retrain(config: Config) -> RetrainOutcome:
    """The whole retrain under the lock; raises a UserError (nothing changed) when it cannot run."""
    db = Database(config.database_url)
    try:
        db.upgrade()
        ensure_configured(db, config)
        with RetrainLock(db, config.retrain.lock_timeout_s):
            return _retrain_locked(db, config)
    finally:
        db.dispose()


def _retrain_locked(db: Database, config: Config) -> RetrainOutcome:
    storage_dir, settings = config.node.storage_dir, config.retrain
    with db.read() as session:
        active = active_version(session, storage_dir)
    if active is None:
        raise UserError("No active model to fine-tune: set [model] checkpoint in the configuration or run "
                        "`riha-node models activate VERSION`.")
    studies = signed_studies(db)
    if len(studies) < settings.min_studies:
        raise NotEnoughData(f"Only {len(studies)} studies have images and a signed report; [retrain] min_studies is "
                            f"{settings.min_studies}. Import more signed reports or lower min_studies.")
    runs = storage_dir / RUNS_DIR
    run_dir = runs / run_fingerprint(active, studies, settings)
    _remove_other_runs(runs, keep=run_dir)  # under the lock, no other retrain uses them
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("retrain started", active_version=active.version, studies=len(studies), run=run_dir.name)
    dataset = write_dataset(run_dir, InstanceStore(storage_dir), db, studies, settings)
    log.info("dataset written", **dataset.counts)

    candidate_path = run_dir / "candidate.riha"
    _train(candidate_path, dataset.manifest, active, config)
    log.info("evaluating", held_out=dataset.counts["val"])
    candidate_scores = evaluate_model(candidate_path, dataset.manifest, split="val", device=config.worker.device)
    active_scores = evaluate_model(active.path, dataset.manifest, split="val", device=config.worker.device)
    promote, reason = judge(candidate_scores, active_scores, settings.metric, settings.margin)

    with db.session() as session:
        current = active_version(session, storage_dir)
        if promote and (current is None or current.sha256 != active.sha256):
            promote = False  # an operator switched models meanwhile: the comparison no longer holds
            reason = (f"refused: the active model changed to {current.version if current else 'none'} while this "
                      "retrain ran; run it again")
        row = register(session, storage_dir, candidate_path, state=CANDIDATE, reason=reason,
                       data_counts=dataset.counts,
                       metrics={"held_out": candidate_scores,
                                "active_on_held_out": {"version": active.version, **active_scores},
                                "gate": {"metric": settings.metric, "margin": settings.margin}})
        if promote:
            activate(session, storage_dir, row.version, promoted_by="retrain", reason=reason)
        elif row.state != ACTIVE:
            row.state, row.reason = REFUSED, reason
        now_active = active_version(session, storage_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # the registry holds the candidate now
    log.info("retrain finished", candidate_version=row.version, promoted=promote, active_version=now_active.version)
    return RetrainOutcome(promoted=promote, candidate_version=row.version, active_version=now_active.version,
                          reason=reason, candidate_scores=candidate_scores, active_scores=active_scores,
                          counts=dataset.counts)


def _train(candidate: Path, manifest: Path, active: ActiveVersion, config: Config) -> None:
    """Fine-tune, or continue the interrupted fine-tuning of the same run; a finished training is not repeated.

    The learning rate drops to a tenth for the last quarter of the epochs so the last epoch settles, and the last
    epoch is the candidate: train_model's own choice, the best held-out BLEU-4, would look at the very studies the
    gate judges on, and on site reports it favours epochs whose reports name no finding at all (measured: BLEU-4 best
    at a clinical F1 of 0.13, against 0.42 at the last epoch). The training state, written every few epochs, is what
    a killed run continues from.
    """
    done = candidate.with_name("trained.json")
    if done.is_file():
        log.info("training already finished in this run")
        return
    settings = config.retrain
    state = _training_state(candidate)
    if state is None or state["epoch"] < settings.epochs:
        log.info("training", resumed=state is not None, from_epoch=state["epoch"] if state else 0,
                 epochs=settings.epochs, processes=settings.processes)
        recipe = dict(init=None if state else active.path, resume=candidate if state else None,
                      epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                      lr_step=max(1, settings.epochs * 3 // 4), lr_gamma=0.1,
                      validate_every=max(1, settings.epochs // 8), augment=settings.augment, keep="last",
                      device=config.worker.device)
        if settings.processes > 1:
            _train_under_torchrun(manifest, candidate, settings.processes, recipe)
        else:
            handler = _ToStructlog()
            model_log = logging.getLogger("riha_model")
            model_log.addHandler(handler)
            model_log.setLevel(logging.INFO)
            try:
                train_model(manifest, candidate, **recipe)
            finally:
                model_log.removeHandler(handler)
    done.write_text(json.dumps({"epochs": settings.epochs}))


def _train_under_torchrun(manifest: Path, candidate: Path, processes: int, recipe: dict) -> None:
    """The same training as `riha-node train` started by torchrun in `processes` processes (one per GPU; Gloo on
    CPUs), its epoch lines passed on as structured log lines."""
    options = {"--init": recipe["init"], "--resume": recipe["resume"], "--epochs": recipe["epochs"],
               "--batch-size": recipe["batch_size"], "--lr": recipe["lr"], "--lr-step": recipe["lr_step"],
               "--lr-gamma": recipe["lr_gamma"], "--validate-every": recipe["validate_every"],
               "--keep": recipe["keep"], "--device": recipe["device"]}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "riha_node.cli", "train", "--data", str(manifest), "--out", str(candidate),
               "--augment" if recipe["augment"] else "--no-augment"]
    command += [str(part) for name, value in options.items() if value is not None for part in (name, value)]
    log.info("training under torchrun", processes=processes)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.strip():
            log.info("training", detail=line.strip())
    if process.wait() != 0:
        raise RetrainFailed(f"Training under torchrun ({processes} processes) exited with {process.returncode}; "
                            "the log lines above say why. The active model is unchanged; run retrain again to "
                            "continue from the last saved epoch.")


def _training_state(candidate: Path) -> dict | None:
    """The training state train_model keeps beside its checkpoint (None before the first one was written)."""
    if not (candidate.is_file() and training_state_path(candidate).is_file()):
        return None
    return torch.load(training_state_path(candidate), map_location="cpu", weights_only=True)


def _remove_other_runs(runs: Path, keep: Path) -> None:
    if runs.is_dir():
        for folder in runs.iterdir():
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)


class ScheduledRetrain:
    """Serve's scheduler job: start `riha-node retrain` as a subprocess when due, unless the last one still runs.

    The subprocess takes the lock itself, so a retrain started by hand or by another node meanwhile makes it exit
    with a one-line reason instead of running twice. It is not waited for: stopping serve leaves it to finish.
    """

    def __init__(self, config: Config):
        self.config = config
        self.process: subprocess.Popen | None = None

    def __call__(self) -> None:
        if self.process is not None and self.process.poll() is None:
            log.info("scheduled retrain skipped: the last one is still running", pid=self.process.pid)
            return
        command = [sys.executable, "-m", "riha_node.cli", "retrain"]
        if self.config.source is not None:
            command += ["--config", str(self.config.source)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        log.info("scheduled retrain started", pid=self.process.pid)
