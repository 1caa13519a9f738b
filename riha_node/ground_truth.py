"""Signed reports as ground truth: read from a verified SR whatever its template, stored, and matched to studies.

A PACS or RIS returns the radiologist's signed report as an SR (VerificationFlag VERIFIED); templates differ from
vendor to vendor, so sections are found by concept name, by code (DCM, LOINC) or by meaning, at any depth, and when
no section is named every TEXT item counts as the findings. A signed report is matched to a study the node holds by
StudyInstanceUID, else by accession number; one that matches nothing is kept aside (study_id NULL) and claimed by
the study when it arrives (`claim_kept_aside`, called by ingest when a study row is created). A study may be signed
more than once: the newest report (signing time, else arrival) is its ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.valuerep import DT
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from riha_node.log import get_logger
from riha_node.models import SignedReport, Study, utcnow

log = get_logger(__name__)

SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every SR Storage SOP class (PS3.4 B.5) lies under it
SOURCE_SR, SOURCE_IMPORT = "sr", "import"

# (code value, coding scheme) of section headings and their text items, from CID 7001/7002 and older templates.
FINDINGS_CODES = frozenset({("121070", "DCM"), ("121071", "DCM"), ("59776-5", "LN"), ("18782-3", "LN")})
IMPRESSION_CODES = frozenset({("121072", "DCM"), ("121073", "DCM"), ("19005-8", "LN"), ("121076", "DCM"),
                              ("121077", "DCM"), ("55110-1", "LN")})
FINDINGS, IMPRESSION = "findings", "impression"


@dataclass(frozen=True)
class SignedText:
    """The text of one signed report: findings and impression as written, and when it was signed."""

    findings: str | None
    impression: str | None
    signed_at: datetime | None = None

    @property
    def text(self) -> str:
        """What training and quality compare: the findings, else the impression, on one line."""
        return collapse_whitespace(self.findings or self.impression or "")


def collapse_whitespace(text: str | None) -> str:
    return " ".join((text or "").split())


def is_structured_report(sop_class_uid: str) -> bool:
    return sop_class_uid.startswith(SR_STORAGE_PREFIX)


def signed_report_in(path: Path, sop_class_uid: str) -> SignedText | None:
    """The signed report in a stored instance, read whole from its file (the receiver's parse defers long values,
    a long report text among them); None for anything that is not a verified SR with readable text."""
    if not is_structured_report(sop_class_uid):
        return None
    try:
        return read_signed_report(dcmread(path))
    except Exception as exc:  # a broken or hostile content tree: the instance stays stored, it is just no ground truth
        log.warning("SR content unreadable, not used as ground truth", file=path.name, error=type(exc).__name__)
        return None


def read_signed_report(ds: Dataset) -> SignedText | None:
    """The report of a verified SR; None when the data set is no SR, is not VERIFIED, or holds no text."""
    if not is_structured_report(str(ds.get("SOPClassUID", ""))):
        return None
    if str(ds.get("VerificationFlag", "")).strip().upper() != "VERIFIED":
        return None
    sections: dict[str, list[str]] = {FINDINGS: [], IMPRESSION: [], "": []}
    _collect(ds.get("ContentSequence") or [], "", sections)
    findings = "\n".join(sections[FINDINGS]) or None
    impression = "\n".join(sections[IMPRESSION]) or None
    if findings is None and impression is None:
        findings = "\n".join(sections[""]) or None  # no named section: every TEXT item is the report
    if findings is None and impression is None:
        return None
    return SignedText(findings=findings, impression=impression, signed_at=_verified_at(ds))


def _collect(items, section: str, sections: dict[str, list[str]]) -> None:
    """Depth first, in document order; an item's own concept name overrides the section it sits in."""
    for item in items:
        here = _section_of(item) or section
        if str(item.get("ValueType", "")).upper() == "TEXT":
            text = str(item.get("TextValue", "") or "").strip()
            if text:
                sections[here].append(text)
        _collect(item.get("ContentSequence") or [], here, sections)


def _section_of(item: Dataset) -> str | None:
    names = item.get("ConceptNameCodeSequence") or []
    if not names:
        return None
    code = names[0]
    key = (str(code.get("CodeValue", "") or code.get("LongCodeValue", "")).strip(),
           str(code.get("CodingSchemeDesignator", "")).strip().upper())
    if key in FINDINGS_CODES:
        return FINDINGS
    if key in IMPRESSION_CODES:
        return IMPRESSION
    meaning = str(code.get("CodeMeaning", "")).lower()
    if "impression" in meaning or "conclusion" in meaning:
        return IMPRESSION
    if "finding" in meaning:
        return FINDINGS
    return None


def _verified_at(ds: Dataset) -> datetime | None:
    """The newest VerificationDateTime (a report may be verified by more than one observer), in UTC."""
    times = []
    for observer in ds.get("VerifyingObserverSequence") or []:
        value = observer.get("VerificationDateTime")
        try:
            parsed = DT(value) if value else None
        except ValueError:
            parsed = None
        if parsed is not None:
            times.append(parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc))
    return max(times).astimezone(timezone.utc) if times else None


def matching_studies(session: Session, study_uid: str | None, accession_number: str | None) -> list[Study]:
    """The study with this StudyInstanceUID; else every study with this accession number (normally one)."""
    if study_uid:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is not None:
            return [study]
    if accession_number:
        return list(session.scalars(select(Study).where(Study.accession_number == accession_number)))
    return []


def already_recorded(session: Session, source_ref: str) -> SignedReport | None:
    return session.scalar(select(SignedReport).where(SignedReport.source_ref == source_ref))


def add_signed_report(session: Session, signed: SignedText, *, study: Study | None, study_uid: str | None,
                      accession_number: str | None, source: str, source_ref: str) -> SignedReport:
    """Store one signed report; `study` None keeps it aside until a matching study arrives."""
    row = SignedReport(study_id=study.id if study else None, study_uid=study_uid, accession_number=accession_number,
                       findings=signed.findings, impression=signed.impression, text=signed.text, source=source,
                       source_ref=source_ref, signed_at=signed.signed_at, received_at=utcnow())
    session.add(row)
    return row


def claim_kept_aside(session: Session, study: Study) -> int:
    """Attach the signed reports kept aside for this study (new, or just given its accession number); returns how
    many."""
    matches = [SignedReport.study_uid == study.study_uid]
    if study.accession_number:
        matches.append(SignedReport.accession_number == study.accession_number)
    result = session.execute(update(SignedReport).where(SignedReport.study_id.is_(None), or_(*matches))
                             .values(study_id=study.id))
    return result.rowcount


def kept_aside_count(session: Session) -> int:
    return session.scalar(select(func.count(SignedReport.id)).where(SignedReport.study_id.is_(None))) or 0


def ground_truth_by_study(session: Session, study_ids: list[int] | None = None) -> dict[int, SignedReport]:
    """Each study's (of `study_ids`, else every study's) current ground truth: its newest signed report (signing
    time, else arrival; then the later row)."""
    query = select(SignedReport).where(SignedReport.study_id.is_not(None))
    if study_ids is not None:
        query = query.where(SignedReport.study_id.in_(study_ids))
    newest: dict[int, SignedReport] = {}
    for row in session.scalars(query):
        held = newest.get(row.study_id)
        if held is None or _recency(row) > _recency(held):
            newest[row.study_id] = row
    return newest


def _recency(row: SignedReport) -> tuple[datetime, datetime, int]:
    return row.signed_at or row.received_at, row.received_at, row.id
