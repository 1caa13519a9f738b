"""What `riha-node status` and `riha-node studies` show, as plain dicts (the CLI renders them as JSON or text)."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from riha_node.config import Config
from riha_node.jobs import counts_by_state
from riha_node.models import Instance, Study
from riha_node.states import StudyState
from riha_node.storage import InstanceStore


def node_status(session: Session, config: Config, store: InstanceStore) -> dict:
    by_state = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
    return {
        "node": {"ae_title": config.node.ae_title, "host": config.node.host, "port": config.node.port},
        "studies": {state.value: by_state.get(state.value, 0) for state in StudyState},
        "instances": session.scalar(select(func.count()).select_from(Instance)),
        "stored_bytes": session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))),
        "queue": counts_by_state(session),
        "model": {"checkpoint": str(config.model.checkpoint) if config.model.checkpoint else None},
        "disk": store.disk_usage() | {"watermark_percent": config.study.disk_watermark_percent},
    }


def list_studies(session: Session, state: StudyState | None = None) -> list[dict]:
    query = select(Study).options(selectinload(Study.instances)).order_by(Study.id)
    if state is not None:
        query = query.where(Study.state == state.value)
    return [_study_row(study) for study in session.scalars(query)]


def _study_row(study: Study) -> dict:
    return {
        "id": study.id,
        "study_uid": study.study_uid,
        "state": study.state,
        "reason": study.state_reason,
        "priority": study.priority,
        "instances": len(study.instances),
        "ignored_instances": [{"sop_instance_uid": i.sop_instance_uid, "reason": i.ignored_reason}
                              for i in study.instances if i.ignored_reason],
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "state_changed_at": study.state_changed_at.isoformat(),
    }
