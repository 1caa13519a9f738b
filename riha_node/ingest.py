"""What a received instance means: is it a chest radiograph, what priority, and how it is recorded.

Kept apart from the DICOM handler (which only moves bytes and answers statuses) so that the rules can be read and
tested on their own.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pydicom import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from riha_node.config import StudyConfig
from riha_node.ground_truth import (SOURCE_SR, SignedText, add_signed_report, already_recorded, claim_kept_aside,
                                    matching_studies)
from riha_node.models import Instance, Job, Study, utcnow
from riha_node.states import REOPENABLE, JobState, StudyState, move
from riha_node.storage import valid_uid

# Requested Procedure Priority (0040,1003) and Study Priority ID (0032,000C) values; lower is sooner.
PRIORITY_RANK = {"STAT": 0, "HIGH": 1, "MEDIUM": 2, "ROUTINE": 2, "LOW": 3}
ROUTINE = PRIORITY_RANK["ROUTINE"]


class InvalidInstance(ValueError):
    """The data set lacks a valid identifying UID; the message says which."""


@dataclass(frozen=True)
class ReceivedInstance:
    """The identifying and routing facts of one received data set, read once from its header."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    priority: int
    patient_id: str | None
    accession_number: str | None
    has_pixel_data: bool

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str) -> "ReceivedInstance":
        uids = {}
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            value = str(ds.get(keyword, "") or "").strip()
            if not valid_uid(value):
                raise InvalidInstance(f"{keyword} is missing or not a valid UID")
            uids[keyword] = value
        return cls(
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            transfer_syntax_uid=transfer_syntax_uid,
            modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined"),
            view_position=_text(ds, "ViewPosition"),
            priority=_priority(ds),
            patient_id=_text(ds, "PatientID"),
            accession_number=_text(ds, "AccessionNumber"),
            has_pixel_data="PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
        )


def _priority(ds: Dataset) -> int:
    """The most urgent of the priorities the data set states; routine when it states none we know."""
    stated = [PRIORITY_RANK.get((_text(ds, k) or "").upper()) for k in ("RequestedProcedurePriority", "StudyPriorityID")]
    return min((rank for rank in stated if rank is not None), default=ROUTINE)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def ignored_reason(instance: ReceivedInstance, rules: StudyConfig) -> str | None:
    """Why this instance is not a chest radiograph the model can read, or None when it is one."""
    if instance.sop_class_uid not in rules.accepted_sop_classes:
        return f"SOP class {instance.sop_class_uid} is not an accepted radiograph class"
    if not instance.has_pixel_data:
        return "no pixel data"
    if (instance.modality or "").upper() not in rules.accepted_modalities:
        return f"modality {instance.modality or '(none)'} is not one of {', '.join(rules.accepted_modalities)}"
    if instance.body_part and instance.body_part.upper() not in rules.accepted_body_parts:
        return f"body part {instance.body_part} is not a chest"
    return None


def patient_key(patient_id: str | None, secret: bytes) -> str | None:
    """A stable pseudonym for the patient under this node's secret: groups studies without keeping the ID."""
    if not patient_id:
        return None
    return hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


def already_stored(session: Session, sop_instance_uid: str) -> bool:
    return session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)) is not None


def record_instance(session: Session, instance: ReceivedInstance, *, reason: str | None, rel_path: str,
                    size_bytes: int, dataset_sha256: str, calling_ae: str, secret: bytes,
                    signed: SignedText | None = None) -> Study | None:
    """Add the instance row and move its study: new, still receiving, re-opened, or ignored.

    A signed report (`signed`, from a verified SR) becomes ground truth. When no study has its StudyInstanceUID it
    goes to the one study with its accession number, else it is kept aside; either way no study row is created
    (that would be an ignored study) and None is returned.
    """
    now = utcnow()
    study = session.scalar(select(Study).where(Study.study_uid == instance.study_uid))
    if signed is not None:
        if study is None and already_recorded(session, instance.sop_instance_uid):
            return None
        matches = matching_studies(session, instance.study_uid, instance.accession_number)
        add_signed_report(session, signed, study=matches[0] if len(matches) == 1 else None,
                          study_uid=instance.study_uid, accession_number=instance.accession_number,
                          source=SOURCE_SR, source_ref=instance.sop_instance_uid)
        if study is None:
            return None
    if study is None:
        study = Study(study_uid=instance.study_uid, state=None, priority=instance.priority,
                      patient_key=patient_key(instance.patient_id, secret),
                      accession_number=instance.accession_number, calling_ae=calling_ae,
                      first_received_at=now, last_received_at=now, state_changed_at=now)
        move(session, study, StudyState.RECEIVING if reason is None else StudyState.IGNORED, reason)
        claim_kept_aside(session, study)
    else:
        study.last_received_at = now
        study.priority = min(study.priority, instance.priority)
        if study.accession_number is None and instance.accession_number:  # first seen on a later instance
            study.accession_number = instance.accession_number
            claim_kept_aside(session, study)
        current = StudyState(study.state)
        if reason is None and current in REOPENABLE:
            cancel_pending_jobs(session, study)
            move(session, study, StudyState.RECEIVING, f"new instance after {current.value}")
    session.add(Instance(study_id=study.id, sop_instance_uid=instance.sop_instance_uid,
                         sop_class_uid=instance.sop_class_uid, series_uid=instance.series_uid,
                         transfer_syntax_uid=instance.transfer_syntax_uid, modality=instance.modality,
                         body_part=instance.body_part, view_position=instance.view_position, ignored_reason=reason,
                         rel_path=rel_path, size_bytes=size_bytes, dataset_sha256=dataset_sha256,
                         calling_ae=calling_ae, received_at=now))
    return study


def cancel_pending_jobs(session: Session, study: Study) -> None:
    session.execute(update(Job).where(Job.study_id == study.id, Job.state == JobState.QUEUED.value)
                    .values(state=JobState.CANCELLED.value, finished_at=utcnow(),
                            last_error="superseded: the study re-opened"))
