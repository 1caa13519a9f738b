"""What an operator does to one study by hand: `riha-node retry` (a second chance for a failed study or an
undelivered draft) and `riha-node discard` (take a study out of the node's work for good)."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from riha_node.errors import UserError
from sqlalchemy import update

from riha_node.export import DISCARDED, FAILED, PENDING, retry_export
from riha_node.jobs import enqueue
from riha_node.ingest import cancel_pending_jobs
from riha_node.models import Export, Report, Study
from riha_node.states import StudyState, can_move, move


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise UserError(f"No study with StudyInstanceUID {study_uid}; `riha-node studies` lists them.")
    return study


def retry_study(session: Session, study_uid: str) -> str:
    """Re-queue a `failed` study or re-send an `export_failed` one's draft; returns what was done."""
    study = _study(session, study_uid)
    if study.state == StudyState.FAILED.value:
        move(session, study, StudyState.QUEUED, "retry requested by an operator")
        enqueue(session, study)
        return f"study {study.id} queued again"
    if study.state == StudyState.EXPORT_FAILED.value:
        report = session.scalars(select(Report).where(Report.study_id == study.id).order_by(Report.id.desc())).first()
        failed = [export for export in report.exports if export.state == FAILED]
        for export in failed:
            retry_export(session, export)
        return f"study {study.id}: draft {report.sop_instance_uid} will be sent again to " \
               f"{', '.join(e.destination for e in failed)}"
    raise UserError(f"Study {study_uid} is {study.state}; only failed and export_failed studies can be retried.")


def discard_study(session: Session, study_uid: str) -> str:
    """Mark the study `ignored` by an operator: its queued job is cancelled and its undelivered drafts are not sent.

    The files and rows stay (nothing PACS was told is stored is deleted); a new chest instance re-opens the study.
    """
    study = _study(session, study_uid)
    if not can_move(StudyState(study.state), StudyState.IGNORED) or study.state == StudyState.IGNORED.value:
        raise UserError(f"Study {study_uid} is {study.state}; a study being processed, already exported or already "
                        "ignored cannot be discarded.")
    cancel_pending_jobs(session, study)
    report_ids = select(Report.id).where(Report.study_id == study.id)
    session.execute(update(Export).where(Export.report_id.in_(report_ids), Export.state.in_((PENDING, FAILED)))
                    .values(state=DISCARDED, last_status="discarded by an operator"))
    move(session, study, StudyState.IGNORED, "discarded by an operator")
    return f"study {study.id} discarded"
