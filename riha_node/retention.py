"""Retention: delete the received images of studies older than `[study] retention_days` once PACS has their draft.

Only `exported` studies qualify (PACS accepted the latest draft SR): a study still waiting for its draft or its
delivery keeps every image, however old. The database rows and the draft SR files stay; each purged instance is
marked with `purged_at`, so the record of what was received is complete; the emptied study folders go. Each study
is purged in its own transaction with its row locked: a late instance that re-opens the study either waits for the
purge or stops it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import PurePosixPath

from sqlalchemy import select

from riha_node.db import Database
from riha_node.log import get_logger
from riha_node.models import Instance, Study, utcnow
from riha_node.states import StudyState
from riha_node.storage import InstanceStore

log = get_logger(__name__)

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Purged:
    studies: int = 0
    instances: int = 0
    bytes_freed: int = 0


def purge_interval_s(retention_days: float) -> float:
    """How often the scheduler purges: a tenth of the retention period, between one second and one hour."""
    return min(3600.0, max(1.0, retention_days * SECONDS_PER_DAY / 10))


def purge_expired(db: Database, store: InstanceStore, retention_days: float) -> Purged:
    """Delete the image files of every delivered study whose last instance arrived more than the period ago."""
    if retention_days <= 0:
        return Purged()
    cutoff = utcnow() - timedelta(days=retention_days)
    with db.read() as session:
        candidates = session.scalars(
            select(Study.id).where(Study.state == StudyState.EXPORTED.value, Study.last_received_at <= cutoff,
                                   Study.instances.any(Instance.purged_at.is_(None))).order_by(Study.id)).all()
    studies = instances = bytes_freed = 0
    for study_id in candidates:
        count, freed = _purge_study(db, store, study_id, cutoff)
        studies, instances, bytes_freed = studies + (count > 0), instances + count, bytes_freed + freed
    if instances:
        log.info("received images purged", studies=studies, instances=instances, bytes_freed=bytes_freed,
                 retention_days=retention_days)
    return Purged(studies, instances, bytes_freed)


def _purge_study(db: Database, store: InstanceStore, study_id: int, cutoff) -> tuple[int, int]:
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one()
        if study.state != StudyState.EXPORTED.value or study.last_received_at > cutoff:
            return 0, 0  # re-opened by a late instance since the candidates were read
        now = utcnow()
        freed = 0
        remaining = session.scalars(select(Instance).where(Instance.study_id == study_id,
                                                           Instance.purged_at.is_(None))).all()
        for instance in remaining:
            path = store.path(instance.rel_path)
            if path.exists():  # a purge interrupted after the unlink, before the commit, left the row unmarked
                freed += path.stat().st_size
                store.remove(instance.rel_path)
            instance.purged_at = now
        for study_folder in {"/".join(PurePosixPath(instance.rel_path).parts[:2]) for instance in remaining}:
            store.remove_empty_folders(study_folder)  # studies/<StudyInstanceUID>
        log.info("study images purged", study_id=study_id, study_uid=study.study_uid, instances=len(remaining),
                 bytes_freed=freed)
        return len(remaining), freed
