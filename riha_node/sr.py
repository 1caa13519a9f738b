"""The draft report as a DICOM Structured Report: one call builds the whole SR instance from the study's images.

Content follows TID 2000 Basic Diagnostic Imaging Report (PS3.16): the document title, the language, a Device observer
that names the model, then one heading per section with the text under it. The SR joins the study of its sources in
a series of its own, and says twice over that no one has read it: CompletionFlag PARTIAL, VerificationFlag
UNVERIFIED. highdicom builds the Enhanced and Comprehensive SR; it has no public class for the Basic Text SR, so that
flavour goes through the SR base class that those two share (`highdicom.sr.sop._SR`), which already takes the SOP
Class UID as an argument.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from typing import Literal, get_args

import highdicom as hd
from highdicom.sr.sop import _SR
from pydicom import DataElement, Dataset, config
from pydicom.charset import python_encoding
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes
from pydicom.uid import BasicTextSRStorage, generate_uid
from pydicom.valuerep import STR_VR, validate_value

from riha_node.storage import valid_uid

Flavour = Literal["comprehensive", "enhanced", "basic_text"]

# CID 7000 document title, CID 7001 headings (LOINC since the DCM headings left the group), CID 7002 elements.
TITLE = codes.LN.DiagnosticImagingReport            # (18748-4, LN, "Diagnostic Imaging Report")
FINDINGS = codes.LN.Findings                        # (59776-5, LN, "Findings")
FINDING = codes.DCM.Finding                         # (121071, DCM, "Finding")
IMPRESSIONS = codes.LN.Impressions                  # (19005-8, LN, "Impressions")
IMPRESSION = codes.DCM.Impression                   # (121073, DCM, "Impression")
# CID 7005: the model read existing images and made a new instance from them.
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # (109102, DCM, "Processing Equipment")

_LANGUAGE_TAG = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # RFC 5646, the scheme of CID 5000
_LANGUAGE_NAMES = {"en": "English", "en-US": "English (United States)", "en-GB": "English (United Kingdom)",
                   "de": "German", "de-DE": "German (Germany)", "fr": "French", "fr-FR": "French (France)",
                   "es": "Spanish", "it": "Italian", "nl": "Dutch", "pt-BR": "Portuguese (Brazil)"}
_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"
_TYPE_2_CONTEXT = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "StudyDate", "StudyTime", "ReferringPhysicianName")  # highdicom copies them from the first source
_FILED_BY = ("PatientID", "PatientName", "AccessionNumber", "IssuerOfPatientID")


def _check_long_string(field: str, value: object) -> None:
    """LO: what General and Contributing Equipment hold (PS3.5 6.2)."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, not {type(value).__name__}.")
    if not value.strip() or len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{field} must be 1 to 64 characters without backslash or control characters: {value!r}.")


def _check_uid(field: str, value: object) -> None:
    if not valid_uid(value):
        raise ValueError(f"{field} must be a DICOM UID (digits and dots, at most 64 characters): {value!r}.")


def _check_text(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, not {type(value).__name__}.")
    if not value.strip():
        raise ValueError(f"{field} must not be empty.")


@dataclass(frozen=True)
class DraftReport:
    """The model's text; the impression is left out of the SR when the model gives none."""

    findings: str
    impression: str | None = None

    def __post_init__(self) -> None:
        _check_text("findings", self.findings)
        if self.impression is not None:
            _check_text("impression (None to leave it out)", self.impression)


@dataclass(frozen=True, kw_only=True)
class AlgorithmInfo:
    """Who wrote the draft: the model (name, version, checkpoint UID) and the software that ran it."""

    name: str = "RIHA"
    version: str
    model_uid: str  # identifies the model checkpoint; becomes the Device Observer UID
    manufacturer: str = "riha-node"
    software_version: str

    def __post_init__(self) -> None:
        for field in ("name", "version", "manufacturer", "software_version"):
            _check_long_string(field, getattr(self, field))
        _check_long_string("name and version", f"{self.name} {self.version}")  # the observer's model name
        _check_uid("model_uid", self.model_uid)


@dataclass(frozen=True, kw_only=True)
class SrOptions:
    """What a site may choose: the SR flavour its PACS accepts, how the series shows there, the report language."""

    flavour: Flavour = "comprehensive"
    series_description: str = "AI DRAFT - NOT VERIFIED"
    series_number: int = 9901
    language: str = "en-US"  # RFC 5646 tag

    def __post_init__(self) -> None:
        if self.flavour not in get_args(Flavour):
            raise ValueError(f"flavour must be one of {', '.join(get_args(Flavour))}, not {self.flavour!r}.")
        _check_long_string("series_description", self.series_description)
        if isinstance(self.series_number, bool) or not isinstance(self.series_number, int):
            raise TypeError(f"series_number must be an int, not {type(self.series_number).__name__}.")
        if not 0 < self.series_number < 2**31:
            raise ValueError(f"series_number must be between 1 and 2^31 - 1, not {self.series_number}.")
        if not isinstance(self.language, str) or not _LANGUAGE_TAG.match(self.language):
            raise ValueError(f"language must be an RFC 5646 tag such as 'en-US', not {self.language!r}.")


@dataclass(frozen=True, kw_only=True)
class Predecessor:
    """An earlier SR of the same report that this one replaces (a re-report after a late instance)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for field in ("study_instance_uid", "series_instance_uid", "sop_class_uid", "sop_instance_uid"):
            _check_uid(f"predecessor {field}", getattr(self, field))

    @classmethod
    def of(cls, sr: Dataset) -> Predecessor:
        """The reference to an SR the node sent before (its header is enough)."""
        return cls(study_instance_uid=sr.StudyInstanceUID, series_instance_uid=sr.SeriesInstanceUID,
                   sop_class_uid=sr.SOPClassUID, sop_instance_uid=sr.SOPInstanceUID)

    def _as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def build_draft_sr(sources: Sequence[Dataset], report: DraftReport, algorithm: AlgorithmInfo,
                   options: SrOptions = SrOptions(), *, series_instance_uid: str | None = None,
                   instance_number: int = 1, predecessor: Predecessor | None = None) -> Dataset:
    """The draft report as an SR instance in the sources' study, ready to write or send.

    `sources` are the study's images (headers suffice: read with stop_before_pixels=True); every one is referenced as
    evidence, and the first gives the patient and study attributes. Without `series_instance_uid` the SR starts a
    new series.
    """
    _check_types(report, algorithm, options, predecessor)
    evidence = _checked_sources(sources)
    series_instance_uid = generate_uid() if series_instance_uid is None else series_instance_uid
    _check_uid("series_instance_uid", series_instance_uid)
    if series_instance_uid in {ds.SeriesInstanceUID for ds in evidence}:
        raise ValueError("series_instance_uid must not be the series of a source image: the SR has its own series.")
    if isinstance(instance_number, bool) or not isinstance(instance_number, int) or not 0 < instance_number < 2**31:
        raise ValueError(f"instance_number must be an int between 1 and 2^31 - 1, not {instance_number!r}.")

    arguments = dict(
        evidence=evidence,
        content=_content(report, algorithm, options.language),
        series_instance_uid=series_instance_uid,
        series_number=options.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.software_version,
        series_description=options.series_description,
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor._as_dataset()] if predecessor else None,
        contributing_equipment=[_model_equipment(algorithm)],
        specific_character_set=_character_set(evidence[0], report, algorithm, options),
    )
    with warnings.catch_warnings():
        # highdicom quotes a single-component Patient's Name in this warning; it must not reach the journal.
        warnings.filterwarnings("ignore", message=_NAME_WARNING, category=UserWarning)
        if options.flavour == "comprehensive":
            return hd.sr.ComprehensiveSR(**arguments)
        if options.flavour == "enhanced":
            return hd.sr.EnhancedSR(**arguments)
        return _SR(sop_class_uid=BasicTextSRStorage, **arguments)


def _check_types(report: object, algorithm: object, options: object, predecessor: object) -> None:
    for name, value, kind in (("report", report, DraftReport), ("algorithm", algorithm, AlgorithmInfo),
                              ("options", options, SrOptions)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, not {type(value).__name__}.")
    if predecessor is not None and not isinstance(predecessor, Predecessor):
        raise TypeError(f"predecessor must be a Predecessor or None, not {type(predecessor).__name__}.")


def _checked_sources(sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources, checked to be distinct instances of one study; the first is replaced by `_study_header`'s copy."""
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError("sources must be a sequence of pydicom Datasets, one per source image.")
    if not sources:
        raise ValueError("sources is empty: an SR needs at least one source image to reference.")
    seen: set[str] = set()
    for index, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f"sources[{index}] must be a pydicom Dataset, not {type(ds).__name__}.")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
            _check_uid(f"sources[{index}].{keyword}", ds.get(keyword))
        if ds.SOPInstanceUID in seen:
            raise ValueError(f"sources[{index}] repeats SOP Instance UID {ds.SOPInstanceUID}.")
        seen.add(ds.SOPInstanceUID)
    studies = {ds.StudyInstanceUID for ds in sources}
    if len(studies) > 1:
        raise ValueError(f"sources come from {len(studies)} studies; an SR reports on exactly one study.")
    patients = {ds.get("PatientID") for ds in sources}
    if len(patients) > 1:
        raise ValueError(f"sources of one study name {len(patients)} different Patient IDs; refusing to pick one.")
    return [_study_header(sources[0]), *sources[1:]]


def _study_header(source: Dataset) -> Dataset:
    """A copy of the source that highdicom takes the patient, study and equipment from, fit to copy from.

    A value that breaks its VR (a Patient's Age of "62" is common) would make the SR invalid too: such a value is
    emptied where the attribute is Type 2 and dropped otherwise. The identifiers a PACS files the SR by stay as sent,
    right or wrong, so the SR lands with its images. A missing Type 2 attribute is added empty.
    """
    header = deepcopy(source)  # the caller's data set stays as it was
    for element in list(header):
        if element.keyword in _FILED_BY or element.VR not in STR_VR or _conforms(element):
            continue
        if element.keyword in _TYPE_2_CONTEXT:
            element.value = None
        else:
            del header[element.tag]
    if header.get("PatientSex") not in (None, "", "M", "F", "O"):
        header.PatientSex = None  # highdicom accepts only the defined terms
    for keyword in _TYPE_2_CONTEXT:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _conforms(element: DataElement) -> bool:
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            if value is not None:
                validate_value(element.VR, str(value), config.RAISE)
    except ValueError:
        return False
    return True


def _character_set(source: Dataset, report: DraftReport, algorithm: AlgorithmInfo,
                   options: SrOptions) -> str | None:
    """The study's own character set when it holds every new string (some PACS expect one per study), else UTF-8."""
    text = "".join([report.findings, report.impression or "", algorithm.name, algorithm.version,
                    algorithm.manufacturer, algorithm.software_version, options.series_description])
    term = source.get("SpecificCharacterSet")
    if not term:
        return None if text.isascii() else "ISO_IR 192"
    if isinstance(term, str) and term in python_encoding:
        try:
            text.encode(python_encoding[term])
            return term
        except UnicodeEncodeError:
            pass
    return "ISO_IR 192"


def _content(report: DraftReport, algorithm: AlgorithmInfo, language: str) -> hd.sr.ContainerContentItem:
    """TID 2000: title, language (TID 1204), Device observer (TID 1002/1004), one heading per section."""
    root = hd.sr.ContainerContentItem(name=TITLE, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(
        hd.sr.CodedConcept(value=language, scheme_designator="RFC5646",
                           meaning=_LANGUAGE_NAMES.get(language, language))))
    root.ContentSequence.extend(hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm.model_uid, name=algorithm.name, manufacturer_name=algorithm.manufacturer,
            model_name=f"{algorithm.name} {algorithm.version}"))))
    root.ContentSequence.append(_section(FINDINGS, FINDING, report.findings))
    if report.impression is not None:
        root.ContentSequence.append(_section(IMPRESSIONS, IMPRESSION, report.impression))
    return root


def _section(heading: Code, element: Code, text: str) -> hd.sr.ContainerContentItem:
    """A CID 7001 heading holding one CID 7002 TEXT item (TID 2002 Report Narrative)."""
    container = hd.sr.ContainerContentItem(name=heading, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=element, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    return container


def _model_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """The model as Contributing Equipment, so a PACS that never opens the content tree still sees which made it."""
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_description=f"Draft report text generated by the {algorithm.name} model, version "
                                 f"{algorithm.version}, checkpoint {algorithm.model_uid}; not verified by a person.",
    )
