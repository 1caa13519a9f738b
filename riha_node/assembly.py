"""Study assembly: a study whose last instance arrived more than the quiet period ago is complete; queue it.

Run periodically by the scheduler. Everything it needs is in the database (state and last arrival time), so a
restarted node closes the same studies at the same moments as one that never stopped.
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from riha_node.db import Database
from riha_node.jobs import enqueue
from riha_node.log import get_logger
from riha_node.models import Study, utcnow
from riha_node.states import StudyState, move

log = get_logger(__name__)


def close_quiet_studies(db: Database, quiet_period_s: float) -> list[int]:
    """Queue every receiving study that has been quiet long enough; returns their ids in queue order."""
    cutoff = utcnow() - timedelta(seconds=quiet_period_s)
    with db.session() as session:
        studies = session.scalars(
            select(Study).where(Study.state == StudyState.RECEIVING.value, Study.last_received_at <= cutoff)
            .order_by(Study.priority, Study.last_received_at, Study.id).with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            move(session, study, StudyState.QUEUED, f"complete after a {quiet_period_s:g} s quiet period")
            enqueue(session, study)
        queued = [(study.id, study.study_uid, study.priority) for study in studies]
    for study_id, study_uid, priority in queued:
        log.info("study queued", study_id=study_id, study_uid=study_uid, priority=priority)
    return [study_id for study_id, _, _ in queued]
