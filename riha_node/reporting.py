"""What `riha-node status`, `riha-node studies` and the Prometheus endpoint show, as plain dicts.

Every figure that lives in the database (studies, queue, stage times, exports, leases, model) is read here, by one
function, so `status --json` and `/metrics` can never disagree: worker processes are separate, and the database is
the only place that sees all of them. Each figure is one aggregate query, cheap enough for every scrape.
"""
from __future__ import annotations

from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session, aliased, selectinload

from riha_node.config import Config
from riha_node.export import DELIVERED, SENDING
from riha_node.jobs import counts_by_state
from riha_node.models import Export, Instance, Job, Report, Study, StudyTransition, utcnow
from riha_node.registry import active_version
from riha_node.states import JobState, StudyState
from riha_node.storage import InstanceStore

# Upper bounds (seconds) of the stage-time histogram buckets: the quiet period and a CPU draft take seconds, a PACS
# that is down for a while makes delivery take hours.
STAGE_BUCKETS_S = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)


def node_status(session: Session, config: Config, store: InstanceStore) -> dict:
    by_state = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
    return {
        "node": {"ae_title": config.node.ae_title, "host": config.node.host, "port": config.node.port},
        "studies": {state.value: by_state.get(state.value, 0) for state in StudyState},
        "instances": session.scalar(select(func.count()).select_from(Instance)),
        "stored_bytes": int(session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)))),  # PG: numeric
        "queue": counts_by_state(session),
        "stages": stage_times(session),
        "exports": export_figures(session),
        "workers": worker_leases(session),
        "model": model_figures(session, config),
        "disk": store.disk_usage() | {"watermark_percent": config.study.disk_watermark_percent},
    }


def stage_times(session: Session) -> dict[str, dict]:
    """Histograms of the seconds each study spent in the three stages of its way back to PACS.

    receive_to_queued: first instance (or the re-opening) to queued; queued_to_reported: (last) queueing to the
    draft; reported_to_delivered: the draft to its acceptance by a destination.
    """
    seconds = _seconds_function(session)
    return {
        "receive_to_queued": _histogram(session, _between_states(seconds, StudyState.RECEIVING, StudyState.QUEUED)),
        "queued_to_reported": _histogram(session, _between_states(seconds, StudyState.QUEUED, StudyState.REPORTED)),
        "reported_to_delivered": _histogram(session, select(seconds(Export.delivered_at, Report.created_at)
                                                            .label("s")).join(Report, Export.report_id == Report.id)
                                            .where(Export.state == DELIVERED)),
    }


def _seconds_function(session: Session):
    if session.get_bind().dialect.name == "sqlite":
        return lambda later, earlier: (func.julianday(later) - func.julianday(earlier)) * 86400.0
    return lambda later, earlier: func.extract("epoch", later - earlier)


def _between_states(seconds, entered: StudyState, reached: StudyState) -> Select:
    """One duration per transition into `reached`: since the study last entered `entered` before it."""
    end, begin = aliased(StudyTransition), aliased(StudyTransition)
    started = (select(func.max(begin.at)).where(begin.study_id == end.study_id, begin.to_state == entered.value,
                                                begin.at <= end.at).scalar_subquery())
    return select(seconds(end.at, started).label("s")).where(end.to_state == reached.value)


def _histogram(session: Session, durations: Select) -> dict:
    column = durations.subquery().c.s
    row = session.execute(select(func.count(column), func.coalesce(func.sum(column), 0.0),
                                 *[func.coalesce(func.sum(case((column <= bound, 1), else_=0)), 0)
                                   for bound in STAGE_BUCKETS_S])).one()
    return {"count": row[0], "sum_s": round(float(row[1]), 3),
            "buckets": {f"{bound:g}": int(count) for bound, count in zip(STAGE_BUCKETS_S, row[2:])}}


def export_figures(session: Session) -> dict:
    """Deliveries by state and attempts; an attempt failed unless it delivered or is still in flight."""
    by_state = dict(session.execute(select(Export.state, func.count()).group_by(Export.state)).all())
    attempts = int(session.scalar(select(func.coalesce(func.sum(Export.attempts), 0))))
    return {"by_state": by_state, "attempts": attempts,
            "failed_attempts": attempts - by_state.get(DELIVERED, 0) - by_state.get(SENDING, 0)}


def worker_leases(session: Session) -> dict:
    """Live workers are those holding a lease they keep renewing; an expired lease is a worker that died."""
    now = utcnow()
    rows = session.execute(select(Job.lease_owner, func.count(), func.max(Job.lease_expires_at))
                           .where(Job.state == JobState.RUNNING.value, Job.lease_owner.is_not(None))
                           .group_by(Job.lease_owner).order_by(Job.lease_owner)).all()
    live = [{"worker": owner, "jobs": jobs, "lease_expires_at": expires.isoformat()}
            for owner, jobs, expires in rows if expires > now]
    return {"holding_leases": live, "stale_leases": sum(jobs for _, jobs, expires in rows if expires <= now)}


def model_figures(session: Session, config: Config) -> dict:
    """The configured checkpoint, the registry's active version, and the version the workers last drafted with."""
    latest = session.execute(select(Report.model_version, Report.created_at)
                             .order_by(Report.id.desc()).limit(1)).first()
    return {
        "checkpoint": str(config.model.checkpoint) if config.model.checkpoint else None,
        "active_version": active.version if (active := active_version(session, config.node.storage_dir)) else None,
        "last_report_version": latest.model_version if latest else None,
        "last_report_at": latest.created_at.isoformat() if latest else None,
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
