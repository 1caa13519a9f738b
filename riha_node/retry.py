"""`riha-node retry STUDY_UID`: an operator's second chance for a failed study or an undelivered draft."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from riha_node.errors import UserError
from riha_node.export import FAILED, retry_export
from riha_node.jobs import enqueue
from riha_node.models import Report, Study
from riha_node.states import StudyState, move


def retry_study(session: Session, study_uid: str) -> str:
    """Re-queue a `failed` study or re-send an `export_failed` one's draft; returns what was done."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise UserError(f"No study with StudyInstanceUID {study_uid}; `riha-node studies` lists them.")
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
