"""The worker: claims queued studies under a lease, drafts their reports in batches, writes the SRs, queues exports.

A worker holds a job only while it heartbeats; if it dies (even `kill -9`) the lease expires and another worker
claims the study again. Its result counts only if, at commit time, the job is still its own and the study has not
re-opened meanwhile, so a study never gets two SRs from one queueing. Failures are retried with exponential backoff
up to `[worker] max_attempts`, then the study is `failed` with the reason (a study without a usable image fails at
once: retrying would not help).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from sqlalchemy import select

from riha_model.errors import RihaModelError
from riha_node import jobs
from riha_node.config import Config
from riha_node.db import Database
from riha_node.export import export_due
from riha_node.log import get_logger
from riha_node.model_runtime import ActiveModel, ModelHolder
from riha_node.models import Export, Instance, Job, Report, Study, utcnow
from riha_node.preprocess import NoUsableImage, StudyInput, prepare_study
from riha_node.sr import DraftReport, Predecessor, SrOptions, build_draft_sr
from riha_node.serve import PARENT_PID_VARIABLE
from riha_node.states import JobState, StudyState, move
from riha_node.stopping import StopSignal
from riha_node.storage import InstanceStore

log = get_logger(__name__)


@dataclass
class ClaimedStudy:
    job: jobs.ClaimedJob
    study_uid: str = ""
    enqueued_at: float = 0.0
    prepared: StudyInput | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Worker:
    def __init__(self, config: Config, worker_id: str | None = None):
        self.config = config
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.db = Database(config.database_url)
        self.store = InstanceStore(config.node.storage_dir)
        self.models = ModelHolder(config, self.db)
        self.lease = timedelta(seconds=config.worker.lease_s)
        self.sr_options = SrOptions(flavour=config.sr.flavour, series_description=config.sr.series_description,
                                    series_number=config.sr.series_number)
        self.held: set[int] = set()
        self._held_lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Claim and process until `stop` is set; the study in hand is finished first."""
        heartbeat = threading.Thread(target=self._heartbeat, args=(stop,), name="lease-heartbeat", daemon=True)
        heartbeat.start()
        log.info("worker started", worker=self.worker_id)
        parent = int(os.environ.get(PARENT_PID_VARIABLE, "0"))
        try:
            while not stop.is_set():
                if parent and os.getppid() != parent:
                    log.warning("serve is gone; worker stopping", worker=self.worker_id)
                    break
                model = self.models.current()
                if model is None:
                    stop.wait(max(self.config.worker.poll_interval_s, 5.0))
                    continue
                claimed = self._claim_batch()
                if not claimed:
                    stop.wait(self.config.worker.poll_interval_s)
                    continue
                self.process(claimed, model)
                export_due(self.db, self.store, self.config)  # first delivery at once; retries are the scheduler's
        finally:  # the heartbeat ends before the interpreter does: a daemon thread caught in exit can abort it
            stop.set()
            heartbeat.join()
        log.info("worker stopped", worker=self.worker_id)

    def _claim_batch(self) -> list[ClaimedStudy]:
        claimed: list[ClaimedStudy] = []
        while len(claimed) < self.config.worker.batch_size:
            job = jobs.claim(self.db, self.worker_id, self.lease)
            if job is None:
                break
            with self._held_lock:
                self.held.add(job.id)
            claimed.append(ClaimedStudy(job=job))
        return claimed

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.config.worker.lease_s / 3):
            with self._held_lock:
                held = list(self.held)
            for job_id in held:
                if not jobs.heartbeat(self.db, job_id, self.worker_id, self.lease):
                    log.warning("lease lost", worker=self.worker_id, job_id=job_id)

    def _release(self, job_id: int) -> None:
        with self._held_lock:
            self.held.discard(job_id)

    def process(self, claimed: list[ClaimedStudy], model: ActiveModel) -> None:
        """Prepare every claimed study, draft them in one forward pass, then write and record each SR."""
        ready: list[ClaimedStudy] = []
        for item in claimed:
            started = time.monotonic()
            with self.db.session() as session:
                study, instances = self._start(session, item)
            log.info("study claimed", study_id=study.id, study_uid=study.study_uid, worker=self.worker_id,
                     attempt=item.job.attempts)
            try:
                item.prepared = prepare_study(self.store, instances)
            except NoUsableImage as exc:
                self._fail(item, str(exc), retry=False)
                continue
            item.timings["decode_s"] = time.monotonic() - started
            ready.append(item)
        if not ready:
            return
        started = time.monotonic()
        try:
            texts = model.generate([item.prepared for item in ready])
        except (RihaModelError, RuntimeError, ValueError) as exc:
            for item in ready:
                self._fail(item, f"the model failed: {exc}", retry=True)
            return
        model_s = (time.monotonic() - started) / len(ready)
        for item, text in zip(ready, texts):
            item.timings["model_s"] = model_s
            if not text.strip():  # the end token won at the first step: the same weights would do it again
                self._fail(item, "the model wrote an empty report", retry=False)
                continue
            try:
                self._finish(item, text, model)
            except Exception as exc:  # writing or recording the SR failed: retry the study later
                log.exception("report not written", study_id=item.job.study_id, worker=self.worker_id)
                self._fail(item, f"writing the SR failed: {type(exc).__name__}: {exc}", retry=True)

    def _start(self, session, item: ClaimedStudy) -> tuple[Study, list[Instance]]:
        study = session.get(Study, item.job.study_id)
        if study.state == StudyState.QUEUED.value:
            move(session, study, StudyState.PROCESSING, f"claimed by {self.worker_id}")
        item.study_uid = study.study_uid
        job = session.get(Job, item.job.id)
        item.timings["queue_wait_s"] = max((utcnow() - job.enqueued_at).total_seconds(), 0.0)
        return study, list(study.instances)

    def _finish(self, item: ClaimedStudy, findings: str, model: ActiveModel) -> None:
        started = time.monotonic()
        with self.db.session() as session:
            previous = session.scalars(select(Report).where(Report.study_id == item.job.study_id)
                                       .order_by(Report.id.desc()).limit(1)).first()
            prior_count = len(session.scalars(select(Report.id).where(Report.study_id == item.job.study_id)).all())
        predecessor = Predecessor(study_instance_uid=item.study_uid, series_instance_uid=previous.series_uid,
                                  sop_class_uid=previous.sop_class_uid,
                                  sop_instance_uid=previous.sop_instance_uid) if previous else None
        sr = build_draft_sr(item.prepared.sources, DraftReport(findings=findings), model.algorithm, self.sr_options,
                            series_instance_uid=previous.series_uid if previous else None,
                            instance_number=prior_count + 1, predecessor=predecessor)
        rel_path = f"reports/{item.study_uid}/{sr.SOPInstanceUID}.dcm"
        self.store.write_dataset(rel_path, sr)
        item.timings["sr_s"] = time.monotonic() - started
        with self.db.session() as session:
            job = session.get(Job, item.job.id)
            study = session.get(Study, item.job.study_id)
            if job.state != JobState.RUNNING.value or job.lease_owner != self.worker_id \
                    or study.state != StudyState.PROCESSING.value:
                superseded = True
            else:
                superseded = False
                report = Report(study_id=study.id, sop_instance_uid=sr.SOPInstanceUID,
                                series_uid=sr.SeriesInstanceUID, sop_class_uid=sr.SOPClassUID, rel_path=rel_path,
                                findings=findings, model_version=model.version,
                                source_instances=len(item.prepared.sources),
                                predecessor_id=previous.id if previous else None, created_at=utcnow(),
                                timings=json.dumps(item.timings))
                session.add(report)
                session.flush()
                for destination in self.config.pacs:
                    session.add(Export(report_id=report.id, destination=destination.ae_title, state="pending",
                                       attempts=0, next_attempt_at=utcnow()))
                move(session, study, StudyState.REPORTED, f"draft by {model.version}")
                job.state, job.finished_at, job.lease_owner = JobState.DONE.value, utcnow(), None
        self._release(item.job.id)
        if superseded:
            self.store.remove(rel_path)
            log.info("report superseded", study_id=item.job.study_id, worker=self.worker_id,
                     reason="the study re-opened or the lease moved to another worker")
            return
        log.info("study reported", study_id=item.job.study_id, study_uid=item.study_uid,
                 sop_instance_uid=sr.SOPInstanceUID, model_version=model.version, worker=self.worker_id,
                 **{k: round(v, 3) for k, v in item.timings.items()})

    def _fail(self, item: ClaimedStudy, reason: str, retry: bool) -> None:
        """Back to the queue after a growing delay, or `failed` for good when retrying cannot help or is used up."""
        with self.db.session() as session:
            job = session.get(Job, item.job.id)
            study = session.get(Study, item.job.study_id)
            if job.state != JobState.RUNNING.value or job.lease_owner != self.worker_id:
                self._release(item.job.id)
                return
            job.last_error, job.lease_owner = reason, None
            if retry and job.attempts < self.config.worker.max_attempts:
                delay = self.config.worker.retry_backoff_s * 2 ** (job.attempts - 1)
                job.state, job.not_before = JobState.QUEUED.value, utcnow() + timedelta(seconds=delay)
                if study.state == StudyState.PROCESSING.value:
                    move(session, study, StudyState.QUEUED, f"retry {job.attempts + 1} in {delay:g} s: {reason}")
                log.warning("study retried", study_id=study.id, worker=self.worker_id, attempt=job.attempts,
                            delay_s=delay, reason=reason)
            else:
                job.state, job.finished_at = JobState.FAILED.value, utcnow()
                if study.state == StudyState.PROCESSING.value:
                    move(session, study, StudyState.FAILED, reason)
                log.error("study failed", study_id=study.id, worker=self.worker_id, reason=reason)
        self._release(item.job.id)


def cpu_threads(configured: int) -> int:
    """The model's CPU threads: as configured, else every core but one, which stays for the listener and the
    database (measured: two threads fighting the listener for two cores made generation several times slower)."""
    return configured or max(1, (os.cpu_count() or 1) - 1)


def run_worker(config: Config) -> None:
    """`riha-node worker`: one worker process until SIGTERM/SIGINT."""
    torch.set_num_threads(cpu_threads(config.worker.threads))
    stop = StopSignal()
    worker = Worker(config)
    worker.db.upgrade()
    worker.run(stop.requested)
    worker.db.dispose()
