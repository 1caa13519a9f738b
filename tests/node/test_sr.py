"""The draft report SR: built from real chest radiographs, checked by dicom3tools' dciodvfy and dcmtk's dsrdump."""
from __future__ import annotations

import copy
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import BasicTextSRStorage, ComprehensiveSRStorage, EnhancedSRStorage, generate_uid

from riha_node.sr import AlgorithmInfo, DraftReport, Predecessor, SrOptions, build_draft_sr
from tests.node.peers import dcmtk
from tests.node.samples import SHARED_SC_JPEG, real_file

FINDINGS = "The heart size is normal. The lungs are clear. No pneumothorax or pleural effusion."
IMPRESSION = "No acute cardiopulmonary abnormality."
ALGORITHM = AlgorithmInfo(version="1.4.2", model_uid="1.2.826.0.1.3680043.8.498.77", software_version="0.1.0")
SOP_CLASS = {"comprehensive": ComprehensiveSRStorage, "enhanced": EnhancedSRStorage, "basic_text": BasicTextSRStorage}


def headers(*paths: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


@pytest.fixture(scope="module")
def rg1() -> list[pydicom.Dataset]:
    """Two CR instances of one study (uncompressed and JPEG 2000)."""
    return headers(real_file("RG1_UNCR.dcm"), real_file("RG1_J2KR.dcm"))


@pytest.fixture(scope="module")
def siim() -> list[pydicom.Dataset]:
    """A Secondary Capture chest image of another study, with empty Type 2 attributes and no Manufacturer."""
    return headers(SHARED_SC_JPEG)


def earlier_sr(sources: list[pydicom.Dataset]) -> Predecessor:
    return Predecessor(study_instance_uid=sources[0].StudyInstanceUID, series_instance_uid=generate_uid(),
                       sop_class_uid=ComprehensiveSRStorage, sop_instance_uid=generate_uid())


def content_items(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(sr.ContentSequence)


def item_named(items, code) -> pydicom.Dataset:
    matches = [item for item in items if item.ConceptNameCodeSequence[0].CodeValue == code.value]
    assert len(matches) == 1, f"expected one {code.meaning!r} item, found {len(matches)}"
    return matches[0]


# --- what the SR says ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", sorted(SOP_CLASS))
def test_sr_joins_the_study_in_its_own_series_and_references_every_source(rg1, flavour):
    sr = build_draft_sr(rg1, DraftReport(FINDINGS, IMPRESSION), ALGORITHM, SrOptions(flavour=flavour))

    assert sr.SOPClassUID == SOP_CLASS[flavour] == sr.file_meta.MediaStorageSOPClassUID
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == rg1[0].StudyInstanceUID
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in rg1}
    assert sr.SOPInstanceUID not in {ds.SOPInstanceUID for ds in rg1}
    assert (sr.SeriesDescription, sr.SeriesNumber, sr.InstanceNumber) == ("AI DRAFT - NOT VERIFIED", 9901, 1)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "StudyDescription"):
        assert sr[keyword].value == rg1[0][keyword].value, keyword
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in sr

    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    referenced = {(study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPClassUID,
                   sop.ReferencedSOPInstanceUID)
                  for study in evidence for series in study.ReferencedSeriesSequence
                  for sop in series.ReferencedSOPSequence}
    assert referenced == {(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID)
                          for ds in rg1}
    assert "PertinentOtherEvidenceSequence" not in sr


def test_content_tree_is_tid_2000_with_a_device_observer(rg1):
    sr = build_draft_sr(rg1, DraftReport(FINDINGS, IMPRESSION), ALGORITHM)

    assert sr.ValueType == "CONTAINER"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert sr.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2000")

    items = content_items(sr)
    language = item_named(items, codes.DCM.LanguageOfContentItemAndDescendants)
    assert language.RelationshipType == "HAS CONCEPT MOD"
    assert (language.ConceptCodeSequence[0].CodeValue, language.ConceptCodeSequence[0].CodingSchemeDesignator) == \
        ("en-US", "RFC5646")
    assert items.index(language) == 0, "TID 1204 comes before the observation context"

    observer_type = item_named(items, codes.DCM.ObserverType)
    assert observer_type.ConceptCodeSequence[0].CodeValue == "121007"  # Device
    context = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in items
               if item.RelationshipType == "HAS OBS CONTEXT"}
    assert context["Device Observer UID"].UID == ALGORITHM.model_uid
    assert context["Device Observer Name"].TextValue == "RIHA"
    assert context["Device Observer Manufacturer"].TextValue == "riha-node"
    assert context["Device Observer Model Name"].TextValue == "RIHA 1.4.2"

    findings = item_named(items, codes.LN.Findings)
    impressions = item_named(items, codes.LN.Impressions)
    assert [i.RelationshipType for i in (findings, impressions)] == ["CONTAINS", "CONTAINS"]
    assert items.index(findings) < items.index(impressions)
    assert item_named(findings.ContentSequence, codes.DCM.Finding).TextValue == FINDINGS
    assert item_named(impressions.ContentSequence, codes.DCM.Impression).TextValue == IMPRESSION


def test_impression_section_is_left_out_when_the_model_gives_none(rg1):
    sr = build_draft_sr(rg1, DraftReport(FINDINGS), ALGORITHM)
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in content_items(sr)]
    assert codes.LN.Findings.value in names
    assert codes.LN.Impressions.value not in names


def test_general_and_contributing_equipment_name_the_software_and_the_model_version(rg1):
    sr = build_draft_sr(rg1, DraftReport(FINDINGS), ALGORITHM)

    assert (sr.Manufacturer, sr.ManufacturerModelName, sr.SoftwareVersions) == ("riha-node", "RIHA", "0.1.0")
    model = [item for item in sr.ContributingEquipmentSequence if item.get("ManufacturerModelName") == "RIHA"]
    assert len(model) == 1
    assert model[0].Manufacturer == "riha-node"
    assert model[0].SoftwareVersions == "1.4.2"
    purpose = model[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == \
        ("109102", "DCM", "Processing Equipment")
    assert "1.4.2" in model[0].ContributionDescription and ALGORITHM.model_uid in model[0].ContributionDescription


def test_predecessor_is_referenced_only_when_given(rg1):
    assert "PredecessorDocumentsSequence" not in build_draft_sr(rg1, DraftReport(FINDINGS), ALGORITHM)

    first = build_draft_sr(rg1, DraftReport(FINDINGS), ALGORITHM)
    again = build_draft_sr(rg1, DraftReport(FINDINGS, IMPRESSION), ALGORITHM,
                           series_instance_uid=first.SeriesInstanceUID, instance_number=2,
                           predecessor=Predecessor.of(first))

    assert (again.SeriesInstanceUID, again.InstanceNumber) == (first.SeriesInstanceUID, 2)
    [study] = again.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [sop] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPClassUID,
            sop.ReferencedSOPInstanceUID) == (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPClassUID,
                                              first.SOPInstanceUID)


def test_options_set_series_and_language(rg1):
    options = SrOptions(flavour="enhanced", series_description="KI-ENTWURF", series_number=42, language="de-DE")
    sr = build_draft_sr(rg1, DraftReport("Kein Pneumothorax."), ALGORITHM, options)
    assert (sr.SeriesDescription, sr.SeriesNumber) == ("KI-ENTWURF", 42)
    language = item_named(content_items(sr), codes.DCM.LanguageOfContentItemAndDescendants).ConceptCodeSequence[0]
    assert (language.CodeValue, language.CodeMeaning) == ("de-DE", "German (Germany)")


def test_character_set_stays_the_studys_unless_the_text_needs_more(rg1):
    latin = build_draft_sr(rg1, DraftReport("Herzgröße normal."), ALGORITHM)
    assert latin.SpecificCharacterSet == rg1[0].SpecificCharacterSet == "ISO_IR 100"

    wider = build_draft_sr(rg1, DraftReport("Herzgröße normal → kein Erguss."), ALGORITHM)
    assert wider.SpecificCharacterSet == "ISO_IR 192"
    assert wider.PatientName == rg1[0].PatientName


def test_sources_missing_type_2_attributes_still_build_and_are_not_changed(siim):
    source = copy.deepcopy(siim[0])
    for keyword in ("AccessionNumber", "StudyID", "PatientBirthDate", "ReferringPhysicianName"):
        del source[keyword]
    before = set(source.keys())

    sr = build_draft_sr([source], DraftReport(FINDINGS), ALGORITHM)

    assert set(source.keys()) == before
    for keyword in ("AccessionNumber", "StudyID", "PatientBirthDate", "ReferringPhysicianName"):
        assert keyword in sr and sr[keyword].is_empty, keyword
    assert sr.StudyInstanceUID == source.StudyInstanceUID


def test_values_that_break_their_vr_are_not_inherited(siim):
    assert siim[0].PatientAge == "62"  # the source is wrong: AS is "062Y"
    source = copy.deepcopy(siim[0])
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        source.StudyDate = "1901-01-01"

    sr = build_draft_sr([source], DraftReport(FINDINGS), ALGORITHM)

    assert "PatientAge" not in sr  # Type 3: dropped
    assert sr["StudyDate"].is_empty  # Type 2: emptied
    assert source.StudyDate == "1901-01-01" and source.PatientAge == "62"


def test_identifiers_stay_as_sent_and_unknown_sex_is_emptied(siim):
    source = copy.deepcopy(siim[0])
    with pytest.warns(UserWarning, match="exceeds the maximum length of 64"):
        source.PatientID = "P" * 70  # too long for LO, but it is how the PACS knows this patient
    source.PatientSex = "MALE"

    with pytest.warns(UserWarning, match="exceeds the maximum length of 64"):  # pydicom, on the SR's copy
        sr = build_draft_sr([source], DraftReport(FINDINGS), ALGORITHM)

    assert sr.PatientID == source.PatientID
    assert sr["PatientSex"].is_empty


def test_patient_name_stays_out_of_warnings(siim, recwarn):
    build_draft_sr(siim, DraftReport(FINDINGS), ALGORITHM)
    assert not [w for w in recwarn if str(siim[0].PatientName) in str(w.message)]


def test_build_is_fast_once_highdicom_has_loaded_its_tables(rg1):
    build_draft_sr(rg1, DraftReport(FINDINGS), ALGORITHM)  # the first call in a process reads highdicom's tables
    started = time.perf_counter()
    for flavour in SOP_CLASS:
        build_draft_sr(rg1, DraftReport(FINDINGS, IMPRESSION), ALGORITHM, SrOptions(flavour=flavour))
    assert (time.perf_counter() - started) / len(SOP_CLASS) < 0.25


# --- what a caller can get wrong ----------------------------------------------------------------------------------

def test_sources_from_two_studies_are_refused(rg1, siim):
    with pytest.raises(ValueError, match="sources come from 2 studies"):
        build_draft_sr([*rg1, *siim], DraftReport(FINDINGS), ALGORITHM)


def test_no_sources_are_refused():
    with pytest.raises(ValueError, match="sources is empty"):
        build_draft_sr([], DraftReport(FINDINGS), ALGORITHM)


@pytest.mark.parametrize("findings", ["", "   \n"])
def test_empty_findings_are_refused(findings):
    with pytest.raises(ValueError, match="findings must not be empty"):
        DraftReport(findings)


def test_empty_impression_is_refused_none_leaves_it_out():
    with pytest.raises(ValueError, match="impression"):
        DraftReport(FINDINGS, " ")


@pytest.mark.parametrize("changes, message", [
    ({"SOPInstanceUID": "../../etc/passwd"}, r"sources\[0\].SOPInstanceUID must be a DICOM UID"),
    ({"StudyInstanceUID": None}, r"sources\[0\].StudyInstanceUID must be a DICOM UID"),
])
def test_source_uids_are_checked(rg1, changes, message):
    source = copy.deepcopy(rg1[0])
    for keyword, value in changes.items():
        if value is None:
            del source[keyword]
        else:
            with pytest.warns(UserWarning, match="Invalid value for VR UI"):
                setattr(source, keyword, value)
    with pytest.raises(ValueError, match=message):
        build_draft_sr([source], DraftReport(FINDINGS), ALGORITHM)


def test_the_same_source_twice_is_refused(rg1):
    with pytest.raises(ValueError, match="repeats SOP Instance UID"):
        build_draft_sr([rg1[0], rg1[0]], DraftReport(FINDINGS), ALGORITHM)


def test_two_patients_in_one_study_are_refused(rg1):
    other = copy.deepcopy(rg1[1])
    other.PatientID = "SOMEONE-ELSE"
    with pytest.raises(ValueError, match="different Patient IDs"):
        build_draft_sr([rg1[0], other], DraftReport(FINDINGS), ALGORITHM)


def test_series_of_a_source_is_refused_for_the_sr(rg1):
    with pytest.raises(ValueError, match="own series"):
        build_draft_sr(rg1, DraftReport(FINDINGS), ALGORITHM, series_instance_uid=rg1[0].SeriesInstanceUID)


def test_wrong_argument_types_are_refused(rg1):
    with pytest.raises(TypeError, match="report must be a DraftReport"):
        build_draft_sr(rg1, FINDINGS, ALGORITHM)
    with pytest.raises(TypeError, match="sources must be a sequence"):
        build_draft_sr(rg1[0], DraftReport(FINDINGS), ALGORITHM)
    with pytest.raises(TypeError, match=r"sources\[1\] must be a pydicom Dataset"):
        build_draft_sr([rg1[0], "RG1_J2KR.dcm"], DraftReport(FINDINGS), ALGORITHM)


@pytest.mark.parametrize("changes, error, message", [
    ({"model_uid": "riha-1.4"}, ValueError, "model_uid must be a DICOM UID"),
    ({"version": ""}, ValueError, "version must be 1 to 64 characters"),
    ({"name": "RIHA\\X"}, ValueError, "name must be 1 to 64 characters"),
    ({"software_version": 1}, TypeError, "software_version must be a str"),
])
def test_algorithm_info_is_checked(changes, error, message):
    with pytest.raises(error, match=message):
        replace(ALGORITHM, **changes)


@pytest.mark.parametrize("changes, error, message", [
    ({"flavour": "xml"}, ValueError, "flavour must be one of comprehensive, enhanced, basic_text"),
    ({"series_number": 0}, ValueError, "series_number must be between"),
    ({"series_number": "9901"}, TypeError, "series_number must be an int"),
    ({"series_description": "x" * 65}, ValueError, "series_description must be 1 to 64"),
    ({"language": "English"}, ValueError, "language must be an RFC 5646 tag"),
])
def test_options_are_checked(changes, error, message):
    with pytest.raises(error, match=message):
        SrOptions(**changes)


def test_predecessor_uids_are_checked():
    with pytest.raises(ValueError, match="predecessor sop_instance_uid must be a DICOM UID"):
        Predecessor(study_instance_uid="1.2", series_instance_uid="1.2.3", sop_class_uid=ComprehensiveSRStorage,
                    sop_instance_uid="")


# --- what real tools say --------------------------------------------------------------------------------------------

def dciodvfy() -> str:
    found = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    assert Path(found).exists(), "dicom3tools' dciodvfy is not installed (apt-get install dicom3tools; .ci/run)"
    return found


def write(sr: pydicom.Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def assert_dciodvfy_clean(path: Path) -> None:
    result = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    assert not errors, "dciodvfy errors:\n" + "\n".join(errors) + "\nwarnings:\n" + "\n".join(warnings)


def dsrdump(path: Path) -> str:
    result = subprocess.run([dcmtk("dsrdump"), "+U8", "+Pl", "+Pt", str(path)], capture_output=True, timeout=60)
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, f"dsrdump exit {result.returncode}: {result.stderr.decode('utf-8', 'replace')}"
    return output


@pytest.mark.peer
@pytest.mark.parametrize("flavour", sorted(SOP_CLASS))
@pytest.mark.parametrize("study", ["rg1", "siim"])
def test_every_flavour_passes_dciodvfy_and_reads_back_in_dsrdump(request, tmp_path, flavour, study):
    sources = request.getfixturevalue(study)
    sr = build_draft_sr(sources, DraftReport(FINDINGS, IMPRESSION), ALGORITHM, SrOptions(flavour=flavour),
                        predecessor=earlier_sr(sources))
    path = write(sr, tmp_path / f"{flavour}.dcm")

    assert_dciodvfy_clean(path)
    dump = dsrdump(path)
    assert FINDINGS in dump and IMPRESSION in dump
    assert "Completion Flag     : PARTIAL" in dump and "Verification Flag   : UNVERIFIED" in dump
    assert "Predecessor Docs    : 1" in dump
    assert "TID 2000 (DCMR)" in dump


@pytest.mark.peer
def test_text_beyond_the_studys_character_set_survives_in_utf8(rg1, tmp_path):
    findings = "Herzgröße normal → kein Erguss; 心影正常."
    path = write(build_draft_sr(rg1, DraftReport(findings), ALGORITHM), tmp_path / "utf8.dcm")

    assert_dciodvfy_clean(path)
    assert findings in dsrdump(path)
    assert pydicom.dcmread(path).ContentSequence[-1].ContentSequence[0].TextValue == findings


def test_written_sr_reads_back_in_highdicom(rg1, tmp_path):
    path = write(build_draft_sr(rg1, DraftReport(FINDINGS), ALGORITHM), tmp_path / "sr.dcm")
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert {uid for _, _, uid, _ in sr.get_evidence()} == {ds.SOPInstanceUID for ds in rg1}
