"""Signed SRs as ground truth: read whatever their template, matched to the study, kept aside when it is unknown."""
from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from sqlalchemy import select

from riha_node.db import Database
from riha_node.ground_truth import read_signed_report, signed_report_in
from riha_node.models import Instance, ReportQuality, SignedReport, Study, utcnow
from riha_node.sr import AlgorithmInfo, DraftReport, build_draft_sr
from tests.node.peers import NodeProcess, dcmtk, dcmtk_env
from tests.node.samples import derive, real_file
from tests.node.test_quality import draft

FINDINGS = "Small left pleural effusion. Heart size is normal."
IMPRESSION = "Small left effusion, otherwise no acute abnormality."
LONG_FINDINGS = " ".join([FINDINGS] * 200)  # 10 kB: longer than the receiver's header parse reads in full
LOCAL = "99RIS"  # a vendor's private coding scheme, as RIS templates use


def local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=LOCAL, meaning=meaning)


def text(name, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def container(name, *children, root: bool = False) -> hd.sr.ContainerContentItem:
    item = hd.sr.ContainerContentItem(
        name=name, relationship_type=None if root else hd.sr.RelationshipTypeValues.CONTAINS)
    item.ContentSequence = hd.sr.ContentSequence(list(children))
    return item


def tid_2000(findings: str = FINDINGS) -> hd.sr.ContainerContentItem:
    """TID 2000 as a RIS writes it: LOINC headings, DCM Finding and Impression text items."""
    return container(codes.LN.DiagnosticImagingReport,
                     container(codes.LN.Findings, text(codes.DCM.Finding, findings)),
                     container(codes.LN.Impressions, text(codes.DCM.Impression, IMPRESSION)), root=True)


def vendor_tree() -> hd.sr.ContainerContentItem:
    """Not TID 2000: private codes, sections two levels down, known only by their meaning."""
    return container(local("RPT", "Radiology Report"),
                     container(local("BODY", "Report Body"),
                               container(local("SEC1", "Findings of the examination"),
                                         text(local("P", "Paragraph"), "Small left pleural effusion."),
                                         text(local("P", "Paragraph"), "Heart size is normal.")),
                               text(local("CONC", "Conclusion"), IMPRESSION)), root=True)


def unnamed_tree() -> hd.sr.ContainerContentItem:
    """No section named at all: every TEXT item is the report."""
    return container(local("RPT", "Radiology Report"),
                     container(local("BODY", "Body"), text(local("T", "Text"), "Small left pleural effusion.")),
                     text(local("T", "Text"), "Heart size is normal."), root=True)


def signed_sr(image: pydicom.Dataset, content, *, verified: bool = True) -> pydicom.Dataset:
    return hd.sr.ComprehensiveSR(
        evidence=[image], content=content, series_instance_uid=generate_uid(), series_number=700,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="RIS", is_complete=True,
        is_final=verified, is_verified=verified,
        verifying_observer_name="Reader^Radiology" if verified else None,
        verifying_organization="Radiology" if verified else None)


@pytest.fixture(scope="module")
def image() -> pydicom.Dataset:
    return pydicom.dcmread(real_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def test_findings_and_impression_of_a_tid_2000_report(image):
    signed = read_signed_report(signed_sr(image, tid_2000()))
    assert (signed.findings, signed.impression) == (FINDINGS, IMPRESSION)
    assert signed.text == FINDINGS
    assert signed.signed_at is not None and signed.signed_at.tzinfo is not None


def test_sections_found_by_meaning_at_any_depth_in_a_vendor_template(image):
    signed = read_signed_report(signed_sr(image, vendor_tree()))
    assert signed.findings == "Small left pleural effusion.\nHeart size is normal."
    assert signed.impression == IMPRESSION
    assert signed.text == FINDINGS  # whitespace collapsed to single spaces


def test_without_named_sections_every_text_item_is_the_findings(image):
    signed = read_signed_report(signed_sr(image, unnamed_tree()))
    assert (signed.findings, signed.impression) == ("Small left pleural effusion.\nHeart size is normal.", None)


def test_unverified_reports_and_the_nodes_own_drafts_are_not_ground_truth(image):
    assert read_signed_report(signed_sr(image, tid_2000(), verified=False)) is None
    draft = build_draft_sr([image], DraftReport(FINDINGS), AlgorithmInfo(
        version="1", model_uid="1.2.826.0.1.3680043.8.498.77", software_version="0.1"))
    assert read_signed_report(draft) is None
    assert read_signed_report(image) is None  # not an SR at all


def test_an_unreadable_sr_file_is_no_ground_truth(tmp_path, image):
    good = save(signed_sr(image, tid_2000()), tmp_path / "good.dcm")
    assert signed_report_in(good, ComprehensiveSRStorage).findings == FINDINGS
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 64)  # no DICOM at all: reading it raises
    assert signed_report_in(broken, ComprehensiveSRStorage) is None


def storescu(node: NodeProcess, *files: Path) -> None:
    result = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", node.ae_title, "127.0.0.1",
                             str(node.port), *map(str, files)], capture_output=True, text=True, env=dcmtk_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr


def save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.peer
@pytest.mark.slow
def test_signed_srs_pushed_with_storescu_become_ground_truth_or_are_kept_aside(tmp_path, image):
    node = NodeProcess(tmp_path / "node", quiet_period_s=30).start()
    try:
        held_uid, unknown_uid = generate_uid(), generate_uid()
        chest = derive(real_file("RG1_UNCR.dcm"), tmp_path / "in" / "chest.dcm", study_uid=held_uid,
                       AccessionNumber="ACC-HELD")
        storescu(node, chest)
        held_image = pydicom.dcmread(chest, stop_before_pixels=True)
        unknown_image = pydicom.dcmread(derive(real_file("RG1_UNCR.dcm"), tmp_path / "later" / "chest.dcm",
                                               study_uid=unknown_uid, AccessionNumber="ACC-LATER"),
                                        stop_before_pixels=True)
        verified = save(signed_sr(held_image, tid_2000(LONG_FINDINGS)), tmp_path / "in" / "verified.dcm")
        vendor = save(signed_sr(unknown_image, vendor_tree()), tmp_path / "in" / "vendor.dcm")
        draft_echo = save(signed_sr(held_image, unnamed_tree(), verified=False), tmp_path / "in" / "unverified.dcm")
        ris_study = pydicom.dcmread(derive(real_file("RG1_UNCR.dcm"), tmp_path / "ris" / "chest.dcm",
                                           study_uid=generate_uid(), AccessionNumber="ACC-HELD"),
                                    stop_before_pixels=True)  # a RIS that files its report in a study of its own
        by_accession = save(signed_sr(ris_study, unnamed_tree()), tmp_path / "in" / "by_accession.dcm")
        drafts = node.database()
        with drafts.session() as session:  # the node's draft, delivered before the radiologist signed
            held_study = session.scalar(select(Study).where(Study.study_uid == held_uid))
            drafted = utcnow() - timedelta(minutes=5)
            draft_id = draft(session, held_study, "Heart size is normal.", "v1", drafted, drafted).id
        drafts.dispose()
        storescu(node, verified, vendor, draft_echo, by_accession)
        storescu(node, vendor)  # sent twice: still one row

        database = Database(f"sqlite:///{node.storage_dir / 'riha-node.db'}")
        try:
            with database.read() as session:
                studies = {s.study_uid: s for s in session.scalars(select(Study))}
                reports = {r.source_ref: r for r in session.scalars(select(SignedReport))}
                stored_srs = set(session.scalars(select(Instance.sop_instance_uid)
                                                 .where(Instance.study_id == studies[held_uid].id)))
                scored = [(row.report_id, row.signed_report_id) for row in session.scalars(select(ReportQuality))]
            assert set(studies) == {held_uid}, "an SR for an unknown study must not create a study"
            assert studies[held_uid].state == "receiving", "an SR must not mark a held study ignored"
            verified_uid, vendor_uid, echo_uid, accession_uid = (pydicom.dcmread(p).SOPInstanceUID
                                                                 for p in (verified, vendor, draft_echo, by_accession))
            assert set(reports) == {verified_uid, vendor_uid, accession_uid}, "only VERIFIED SRs are ground truth"
            assert reports[accession_uid].study_id == studies[held_uid].id, "matched by accession number"
            held = reports[verified_uid]
            assert (held.study_id, held.source, held.findings, held.impression) == (
                studies[held_uid].id, "sr", LONG_FINDINGS, IMPRESSION)
            assert {verified_uid, echo_uid} <= stored_srs, "SRs for a held study are stored as instances"
            assert sorted(scored) == [(draft_id, held.id), (draft_id, reports[accession_uid].id)], \
                "each signed SR is scored against the delivered draft on arrival, before `quality` runs"
            aside = reports[vendor_uid]
            assert (aside.study_id, aside.study_uid, aside.accession_number) == (None, unknown_uid, "ACC-LATER")
            assert aside.impression == IMPRESSION
            assert list((node.storage_dir / "studies" / unknown_uid).rglob(f"{vendor_uid}.dcm")), "its file is kept"

            summary = json.loads(node.cli("quality", "--json").stdout)
            assert (summary["kept_aside"], summary["signed_reports"], summary["studies_with_ground_truth"]) == (1, 3, 1)

            storescu(node, tmp_path / "later" / "chest.dcm")  # the study arrives: it claims its signed report
            with database.read() as session:
                claimed = session.scalar(select(SignedReport).where(SignedReport.source_ref == vendor_uid))
                study = session.scalar(select(Study).where(Study.study_uid == unknown_uid))
            assert claimed.study_id == study.id and study.state == "receiving"
        finally:
            database.dispose()
        log = node.log_text()
        assert "signed report for a study not held" in log
        for secret in ("pleural effusion", "Small left", "ACC-HELD", "ACC-LATER"):
            assert secret not in log, f"{secret!r} leaked into the log"
    finally:
        assert node.stop() == 0
