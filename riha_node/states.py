"""The study life cycle: which state may follow which, and the one function that moves a study.

    (new) -> receiving | ignored
    receiving --quiet period--> queued --claimed--> processing --> reported --> exported
    a new chest instance re-opens queued, processing, reported, exported, export_failed, failed and ignored studies
    an operator may discard (-> ignored) a receiving, queued, reported, export_failed or failed study

Every change is written with an audit row in the same transaction as the change itself.
"""
from __future__ import annotations

from enum import StrEnum

from sqlalchemy.orm import Session

from riha_node.models import Study, StudyTransition, utcnow


class StudyState(StrEnum):
    RECEIVING = "receiving"  # instances arriving; closes after the quiet period
    QUEUED = "queued"  # complete; a report job waits for a worker
    PROCESSING = "processing"  # a worker holds the job
    REPORTED = "reported"  # draft SR written, not yet accepted by PACS
    EXPORTED = "exported"  # PACS accepted the draft SR
    EXPORT_FAILED = "export_failed"  # every export attempt failed; retried later or on demand
    FAILED = "failed"  # the study cannot be reported (reason recorded)
    IGNORED = "ignored"  # nothing in it is a chest radiograph (reason recorded)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # superseded, e.g. the study re-opened before a worker took it


REOPENABLE = {StudyState.QUEUED, StudyState.PROCESSING, StudyState.REPORTED, StudyState.EXPORTED,
              StudyState.EXPORT_FAILED, StudyState.FAILED, StudyState.IGNORED}

ALLOWED: dict[StudyState | None, set[StudyState]] = {
    None: {StudyState.RECEIVING, StudyState.IGNORED},
    StudyState.RECEIVING: {StudyState.QUEUED, StudyState.IGNORED},
    StudyState.QUEUED: {StudyState.RECEIVING, StudyState.PROCESSING, StudyState.IGNORED},
    StudyState.PROCESSING: {StudyState.RECEIVING, StudyState.REPORTED, StudyState.FAILED, StudyState.QUEUED},
    StudyState.REPORTED: {StudyState.RECEIVING, StudyState.EXPORTED, StudyState.EXPORT_FAILED, StudyState.IGNORED},
    StudyState.EXPORTED: {StudyState.RECEIVING},
    StudyState.EXPORT_FAILED: {StudyState.RECEIVING, StudyState.EXPORTED, StudyState.REPORTED, StudyState.IGNORED},
    StudyState.FAILED: {StudyState.RECEIVING, StudyState.QUEUED, StudyState.IGNORED},
    StudyState.IGNORED: {StudyState.RECEIVING},
}


class InvalidTransition(RuntimeError):
    """A code path tried a state change the life cycle does not allow: a bug, not an operator error."""


def can_move(current: StudyState | None, new: StudyState) -> bool:
    return new in ALLOWED[current]


def move(session: Session, study: Study, new: StudyState, reason: str | None = None) -> None:
    """Change the study's state (validated) and record the change in the audit trail."""
    current = StudyState(study.state) if study.state else None
    if not can_move(current, new):
        raise InvalidTransition(f"study {study.id}: {current} -> {new} is not allowed")
    now = utcnow()
    study.state = new.value
    study.state_reason = reason
    study.state_changed_at = now
    if study.id is None:
        session.add(study)
        session.flush()
    session.add(StudyTransition(study_id=study.id, from_state=current and current.value, to_state=new.value,
                                reason=reason, at=now))
