"""The job queue: enqueue a study, claim the next job atomically under a lease, finish it.

The claim is one UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING statement: on PostgreSQL the
row lock lets concurrent workers skip each other's candidates; on SQLite (where FOR UPDATE renders as nothing) the
single writer lock makes the statement atomic. Either way the outer `state` condition guarantees that two claimers
never both win the same job.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from riha_node.db import Database
from riha_node.models import Job, Study, utcnow
from riha_node.states import JobState

REPORT = "report"


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_id: int
    kind: str
    attempts: int
    lease_expires_at: datetime


def enqueue(session: Session, study: Study, kind: str = REPORT) -> Job:
    job = Job(study_id=study.id, kind=kind, state=JobState.QUEUED.value, priority=study.priority,
              enqueued_at=utcnow(), attempts=0)
    session.add(job)
    return job


def claim(db: Database, worker_id: str, lease: timedelta, kind: str = REPORT) -> ClaimedJob | None:
    """Take the most urgent claimable job (STAT first, then oldest), or an expired lease; None when there is none."""
    now = utcnow()
    claimable = and_(
        Job.kind == kind,
        or_(and_(Job.state == JobState.QUEUED.value, or_(Job.not_before.is_(None), Job.not_before <= now)),
            and_(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)),
    )
    candidate = (select(Job.id).where(claimable).order_by(Job.priority, Job.enqueued_at, Job.id).limit(1)
                 .with_for_update(skip_locked=True).scalar_subquery())
    statement = (update(Job).where(Job.id == candidate, claimable)
                 .values(state=JobState.RUNNING.value, lease_owner=worker_id, lease_expires_at=now + lease,
                         attempts=Job.attempts + 1)
                 .returning(Job.id, Job.study_id, Job.kind, Job.attempts, Job.lease_expires_at)
                 .execution_options(synchronize_session=False))
    with db.session() as session:
        row = session.execute(statement).first()
    return ClaimedJob(*row) if row else None


def heartbeat(db: Database, job_id: int, worker_id: str, lease: timedelta) -> bool:
    """Extend our lease; False when the job is no longer ours (it expired and another worker claimed it)."""
    with db.session() as session:
        result = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == worker_id,
                                                   Job.state == JobState.RUNNING.value)
                                 .values(lease_expires_at=utcnow() + lease))
    return result.rowcount == 1


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state.value: 0 for state in (JobState.QUEUED, JobState.RUNNING)} | {s: n for s, n in rows}
