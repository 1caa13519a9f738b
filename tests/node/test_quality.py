"""Draft versus signed report: which pair is compared, and the summary checked against a hand computation."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from sqlalchemy import func, select

from riha_node.cli import main
from riha_node.ground_truth import SOURCE_IMPORT, SignedText, add_signed_report
from riha_node.models import Export, Report, ReportQuality, Study
from riha_node.quality import summarise, update_quality
from tests.node.peers import NodeProcess
from tests.node.test_import_reports import add_study


def at(month: int, day: int) -> datetime:
    return datetime(2026, month, day, 12, tzinfo=timezone.utc)


def draft(session, study, findings: str, version: str, created: datetime, delivered: datetime | None) -> Report:
    report = Report(study_id=study.id, sop_instance_uid=generate_uid(), series_uid=generate_uid(),
                    sop_class_uid=ComprehensiveSRStorage, rel_path="r.dcm", findings=findings, model_version=version,
                    source_instances=1, created_at=created)
    session.add(report)
    session.flush()
    session.add(Export(report_id=report.id, destination="PACS", state="delivered" if delivered else "pending",
                       attempts=1, next_attempt_at=created, delivered_at=delivered))
    return report


def signed(session, study, text: str, received: datetime, signed_at: datetime | None = None):
    row = add_signed_report(session, SignedText(text, None, signed_at), study=study, study_uid=None,
                            accession_number=None, source=SOURCE_IMPORT, source_ref=generate_uid())
    row.received_at = received
    return row


@pytest.fixture
def node(tmp_path, database_url) -> NodeProcess:
    """Four studies drafted by two model versions in two months, with signed reports (and one kept aside)."""
    node = NodeProcess(tmp_path / "node", database_url=database_url)
    database = node.database()
    with database.session() as session:
        a, b, c, d = (add_study(session, generate_uid()) for _ in range(4))
        draft(session, a, "Large right pleural effusion.", "v1", at(10, 5), at(10, 5))
        signed(session, a, "Large right pleural effusion.", at(10, 9))
        draft(session, b, "There is cardiomegaly.", "v0", at(10, 1), at(10, 1))  # superseded by the next draft
        draft(session, b, "Small left pleural effusion is seen.", "v1", at(10, 20), at(10, 20))
        signed(session, b, "Small left pleural effusion is present.", at(10, 25))
        draft(session, b, "There is cardiomegaly.", "v1", at(10, 28), at(10, 28))  # after signing: never seen
        draft(session, c, "There is no pneumothorax.", "v2", at(11, 10), at(11, 10))
        signed(session, c, "There is a right pneumothorax.", at(11, 12), signed_at=at(11, 12))
        signed(session, c, "There is no pneumothorax.", at(11, 12), signed_at=at(11, 11))  # signed earlier: superseded
        draft(session, d, "There is no pneumothorax.", "v2", at(11, 10), None)  # not delivered
        signed(session, d, "There is no pneumothorax.", at(11, 12))
        signed(session, None, "There is no pneumothorax.", at(11, 12))  # no matching study
    database.dispose()
    return node


def rouge_l(lcs: int, hypothesis: int, reference: int, beta: float = 1.2) -> float:
    precision, recall = lcs / hypothesis, lcs / reference
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


# Tokens after R2Gen cleaning, "." included:
#   A identical                                        BLEU-4 1, ROUGE-L 1
#   B "small left pleural effusion is seen ." against "... is present ."
#     n-gram precisions 6/7, 4/6, 3/5, 2/4, equal lengths (no brevity penalty); longest common subsequence 6 of 7
#   C "there is no pneumothorax ." against "there is a right pneumothorax ."
#     no common 4-gram: BLEU-4 0; longest common subsequence 4, of 5 and 6 tokens
# CheXpert: A and B say Pleural Effusion on both sides (14 of 14 agree, 2 true positives). C's draft says No Finding
# and negates Pneumothorax, the signed report says Pneumothorax: 12 of 14 agree, 1 false positive, 1 false negative.
BLEU_4_B = (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
V1 = {"model_version": "v1", "month": "2026-10", "studies": 2, "bleu_4": (1 + BLEU_4_B) / 2, "rouge_l": (1 + 6 / 7) / 2,
      "ce_agreement": 1.0, "ce_micro_f1": 1.0}
V2 = {"model_version": "v2", "month": "2026-11", "studies": 1, "bleu_4": 0.0, "rouge_l": rouge_l(4, 5, 6),
      "ce_agreement": 12 / 14, "ce_micro_f1": 0.0}


def assert_groups(groups: list[dict], expected: list[dict]) -> None:
    assert [(g["model_version"], g["month"], g["studies"]) for g in groups] == [
        (e["model_version"], e["month"], e["studies"]) for e in expected]
    for group, wanted in zip(groups, expected):
        for key in ("bleu_4", "rouge_l", "ce_agreement", "ce_micro_f1"):
            assert group[key] == pytest.approx(wanted[key], abs=1e-6), key


def test_summary_by_model_version_and_month_matches_a_hand_computation(node, node_database):
    result = CliRunner().invoke(main, ["quality", "--json", "--config", str(node.config_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert_groups(summary["groups"], [V1, V2])
    assert (summary["signed_reports"], summary["studies_with_ground_truth"], summary["studies_without_delivered_draft"],
            summary["kept_aside"], summary["not_yet_scored"]) == (6, 4, 1, 1, 0)

    since = CliRunner().invoke(main, ["quality", "--since", "2026-11-01", "--config", str(node.config_path)])
    assert since.exit_code == 0, since.output
    lines = since.stdout.splitlines()
    assert lines[1].split() == ["v2", "2026-11", "1", "0.0000", f"{V2['rouge_l']:.4f}", "0.8571", "0.0000"]
    assert len(lines) == 3 and "1 kept aside" in lines[2]


def test_scoring_one_study_leaves_the_others_to_a_later_run(node_database):
    """What the SCP does when a signed SR arrives: score that study's pair only."""
    with node_database.read() as session:
        study_a = session.scalar(select(Report.study_id).where(Report.findings == "Large right pleural effusion."))
    assert update_quality(node_database, [study_a]) == 1
    assert update_quality(node_database, [study_a]) == 0
    assert update_quality(node_database) == 2


def test_each_pair_is_scored_once_and_a_newer_signed_report_makes_a_new_pair(node_database):
    assert update_quality(node_database) == 3
    assert update_quality(node_database) == 0
    with node_database.session() as session:
        study_a = session.scalar(select(Study).join(Report).where(Report.findings == "Large right pleural effusion."))
        signed(session, study_a, "Small right pleural effusion.", at(12, 1))
    with node_database.read() as session:
        assert summarise(session)["not_yet_scored"] == 1
    assert update_quality(node_database) == 1
    with node_database.read() as session:
        assert session.scalar(select(func.count(ReportQuality.id))) == 4  # the old pair stays as history
        v1 = summarise(session)["groups"][0]
    # A now: "large right pleural effusion ." against "small right pleural effusion .": precisions 4/5, 3/4, 2/3,
    # 1/2; longest common subsequence 4 of 5.
    assert v1["bleu_4"] == pytest.approx(((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 + BLEU_4_B) / 2, abs=1e-6)
    assert v1["rouge_l"] == pytest.approx((4 / 5 + 6 / 7) / 2, abs=1e-6)
