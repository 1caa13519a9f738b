"""Delivering draft SRs to PACS: one C-STORE per report and destination, retried with backoff, never a storm.

Each export row is claimed under a short lease (like a job), so one delivery attempt is in flight at a time however
many schedulers run. A failure waits `backoff_s * 2**(attempt-1)` (capped at `backoff_max_s`); after `max_attempts`
the export is `failed`, its study `export_failed`, and it is tried again `retry_failed_after_s` later or at once with
`riha-node retry`.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pydicom
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import and_, or_, select, update

from riha_node.config import Config, ConfigError, DestinationConfig
from riha_node.db import Database
from riha_node.log import get_logger
from riha_node.models import Export, Report, Study, utcnow
from riha_node.states import StudyState, move
from riha_node.storage import InstanceStore
from riha_node.tls import client_context

log = get_logger(__name__)

SEND_LEASE = timedelta(minutes=5)
PENDING, SENDING, DELIVERED, FAILED = "pending", "sending", "delivered", "failed"
DISCARDED = "discarded"  # an operator discarded the study: never sent, never revived


def export_due(db: Database, store: InstanceStore, config: Config) -> int:
    """Try every export that is due now, each once; returns how many were delivered."""
    _revive_failed(db)
    delivered = 0
    while (claimed := _claim(db)) is not None:
        export_id, destination_ae, rel_path, attempts = claimed
        try:
            destination = config.destination(destination_ae)
            outcome = send_file(store.path(rel_path), destination, config)
        except ConfigError:
            outcome = f"destination {destination_ae} is no longer configured"
            destination = None
        delivered += _record(db, export_id, outcome, destination, attempts)
    return delivered


def send_file(path: Path, destination: DestinationConfig, config: Config) -> str | None:
    """C-STORE one file; None on success, else what went wrong (for the export row and the log)."""
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.network_timeout = config.node.acse_timeout_s
    ae.dimse_timeout = config.node.dimse_timeout_s
    sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (client_context(config.tls), None) if destination.tls else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "no association (peer down or unreachable)"
    try:
        answer = assoc.send_c_store(path)
    finally:
        assoc.release()
    status = getattr(answer, "Status", None)
    if status is None:
        return "no C-STORE response"
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:  # success, or success with a warning
        return None
    return f"C-STORE status 0x{status:04X}"


def _claim(db: Database) -> tuple[int, str, str, int] | None:
    now = utcnow()
    due = or_(and_(Export.state == PENDING, Export.next_attempt_at <= now),
              and_(Export.state == SENDING, Export.lease_expires_at < now))
    candidate = (select(Export.id).where(due).order_by(Export.next_attempt_at, Export.id).limit(1)
                 .with_for_update(skip_locked=True).scalar_subquery())
    with db.session() as session:
        row = session.execute(update(Export).where(Export.id == candidate, due)
                              .values(state=SENDING, lease_expires_at=now + SEND_LEASE, attempts=Export.attempts + 1)
                              .returning(Export.id, Export.destination, Export.report_id, Export.attempts)
                              .execution_options(synchronize_session=False)).first()
        if row is None:
            return None
        rel_path = session.scalar(select(Report.rel_path).where(Report.id == row.report_id))
    return row.id, row.destination, rel_path, row.attempts


def _record(db: Database, export_id: int, failure: str | None, destination: DestinationConfig | None,
            attempts: int) -> int:
    now = utcnow()
    with db.session() as session:
        export = session.get(Export, export_id)
        report = export.report
        study = session.get(Study, report.study_id)
        ids = {"study_id": study.id, "study_uid": study.study_uid, "sop_instance_uid": report.sop_instance_uid,
               "destination": export.destination, "attempt": attempts}
        export.last_status = failure or "delivered"
        if failure is None:
            export.state, export.delivered_at = DELIVERED, now
            log.info("draft delivered", **ids)
            if _is_latest(session, report) and all(e.state == DELIVERED for e in report.exports) \
                    and study.state in (StudyState.REPORTED.value, StudyState.EXPORT_FAILED.value):
                move(session, study, StudyState.EXPORTED, f"accepted by {', '.join(e.destination for e in report.exports)}")
            return 1
        if destination is None or attempts >= destination.max_attempts:
            export.state = FAILED
            export.next_attempt_at = now + timedelta(seconds=destination.retry_failed_after_s if destination else 3600)
            log.error("export failed", **ids, reason=failure, retry_at=export.next_attempt_at.isoformat())
            if _is_latest(session, report) and study.state == StudyState.REPORTED.value:
                move(session, study, StudyState.EXPORT_FAILED, f"{export.destination}: {failure}")
        else:
            delay = min(destination.backoff_s * 2 ** (attempts - 1), destination.backoff_max_s)
            export.state, export.next_attempt_at = PENDING, now + timedelta(seconds=delay)
            log.warning("export retried", **ids, reason=failure, delay_s=delay)
    return 0


def _is_latest(session, report: Report) -> bool:
    latest = session.scalar(select(Report.id).where(Report.study_id == report.study_id).order_by(Report.id.desc()))
    return latest == report.id


def _revive_failed(db: Database) -> None:
    """Failed exports whose waiting time is over go back to pending, their study back to `reported` (rows another
    process is reviving are skipped, so a study's transition is recorded once)."""
    with db.session() as session:
        due = select(Export).where(Export.state == FAILED, Export.next_attempt_at <= utcnow())
        for export in session.scalars(due.with_for_update(skip_locked=True)):
            retry_export(session, export)


def retry_export(session, export: Export) -> None:
    export.state, export.attempts, export.next_attempt_at = PENDING, 0, utcnow()
    study = session.get(Study, export.report.study_id)
    if study.state == StudyState.EXPORT_FAILED.value:
        move(session, study, StudyState.REPORTED, "export retried")
