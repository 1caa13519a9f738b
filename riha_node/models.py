"""The database tables: studies, the instances they hold, the jobs that process them, and every state change.

Patient identifiers are not stored in clear: `patient_key` is an HMAC-SHA256 of PatientID under the node's own secret key, enough to keep one
patient's studies together (e.g. for a train/validation split) without keeping the ID. The accession number is kept
because signed reports from a RIS are matched by it; it never appears in a log line.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator,
                        UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in Python, naive UTC in the database: SQLite keeps no zone, PostgreSQL gets the same."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect):
        return None if value is None else value.replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    state_reason: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=2)
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state_changed_at: Mapped[datetime] = mapped_column(UTCDateTime)

    instances: Mapped[list["Instance"]] = relationship(back_populates="study", order_by="Instance.id")
    jobs: Mapped[list["Job"]] = relationship(back_populates="study", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    ignored_reason: Mapped[str | None] = mapped_column(Text)
    rel_path: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # received file deleted by retention

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    """One unit of queued work on a study; claimed atomically by one worker under a lease."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "state", "priority", "enqueued_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(back_populates="jobs")


class StudyTransition(Base):
    """The audit trail: every study state change, when and why."""

    __tablename__ = "study_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class Report(Base):
    """A draft SR the node wrote for a study; a re-report after a late instance names its predecessor."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    rel_path: Mapped[str] = mapped_column(String(300))
    findings: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(64))
    source_instances: Mapped[int] = mapped_column(Integer)
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    timings: Mapped[str | None] = mapped_column(Text)  # JSON: seconds spent waiting, decoding, in the model, ...

    exports: Mapped[list["Export"]] = relationship(back_populates="report", order_by="Export.id")


class Export(Base):
    """Delivery of one report to one destination, retried with backoff; claimed under a lease like a job."""

    __tablename__ = "exports"
    __table_args__ = (Index("ix_exports_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    destination: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    report: Mapped[Report] = relationship(back_populates="exports")


class SignedReport(Base):
    """A report a radiologist signed: the study's ground truth (the newest one wins) for training and quality.

    `study_id` is NULL while no study the node holds matches (kept aside); it is filled in when the study arrives.
    `source_ref` is the SR's SOP Instance UID or "FILE:LINE" of an import, so the same report is never stored twice.
    """

    __tablename__ = "signed_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    findings: Mapped[str | None] = mapped_column(Text)
    impression: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)  # findings, else impression, whitespace collapsed
    source: Mapped[str] = mapped_column(String(16))  # "sr" or "import"
    source_ref: Mapped[str] = mapped_column(String(255), unique=True)
    signed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ReportQuality(Base):
    """How far a signed report moved from the draft the radiologist saw; one row per (draft, signed report) pair."""

    __tablename__ = "report_quality"
    __table_args__ = (UniqueConstraint("report_id", "signed_report_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    signed_report_id: Mapped[int] = mapped_column(ForeignKey("signed_reports.id"), index=True)
    bleu_4: Mapped[float] = mapped_column(Float)
    rouge_l: Mapped[float] = mapped_column(Float)
    chexpert: Mapped[str] = mapped_column(Text)  # JSON: {observation: {"signed": label, "draft": label}}
    model_version: Mapped[str] = mapped_column(String(64))
    computed_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ModelVersion(Base):
    """A checkpoint the node knows: copied into storage_dir/models/, with where it came from and how it scored.

    `state`: active (the workers' model; exactly one, enforced by a partial unique index), candidate (trained, not yet
    judged), refused (failed the evaluation gate), retired (was active). `data_counts` and `metrics` are JSON.
    """

    __tablename__ = "model_versions"
    __table_args__ = (Index("uq_model_versions_one_active", "state", unique=True,
                            sqlite_where=text("state = 'active'"), postgresql_where=text("state = 'active'")),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(300))  # relative to storage_dir
    parent_sha256: Mapped[str | None] = mapped_column(String(64))
    data_counts: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    promoted_by: Mapped[str | None] = mapped_column(String(16))  # operator, retrain or config
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TaskLock(Base):
    """A named lock that survives a crash: held by `owner` (host:pid) until `expires_at`, renewed by a heartbeat."""

    __tablename__ = "task_locks"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
