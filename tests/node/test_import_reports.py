"""`riha-node import-reports`: RIS exports matched to studies, counted, all or nothing for a malformed file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from riha_node.cli import main
from riha_node.ground_truth import ground_truth_by_study
from riha_node.ingest import ReceivedInstance, record_instance
from riha_node.models import SignedReport, Study
from tests.node.peers import NodeProcess

HELD_UID = "1.2.826.0.1.3680043.8.498.1001"
UNKNOWN_UID = "1.2.826.0.1.3680043.8.498.1999"


def add_study(session, study_uid: str, accession_number: str | None = None) -> Study:
    """A chest radiograph received the way the DICOM handler records one."""
    instance = ReceivedInstance(study_uid=study_uid, series_uid=generate_uid(), sop_instance_uid=generate_uid(),
                                sop_class_uid=ComputedRadiographyImageStorage,
                                transfer_syntax_uid=ExplicitVRLittleEndian, modality="CR", body_part="CHEST",
                                view_position="PA", priority=2, patient_id="P-1", accession_number=accession_number,
                                has_pixel_data=True)
    return record_instance(session, instance, reason=None, rel_path="x.dcm", size_bytes=1, dataset_sha256="0" * 64,
                           calling_ae="STORESCU", secret=b"node key")


@pytest.fixture
def node(tmp_path, database_url) -> NodeProcess:
    """A node's configuration and migrated database (no process: import-reports works on the database)."""
    node = NodeProcess(tmp_path / "node", database_url=database_url)
    database = node.database()
    with database.session() as session:
        add_study(session, HELD_UID)
        add_study(session, generate_uid(), "ACC-2")
        add_study(session, generate_uid(), "ACC-DUP")
        add_study(session, generate_uid(), "ACC-DUP")
    database.dispose()
    return node


def run(node: NodeProcess, *args: str):
    return CliRunner().invoke(main, [*args, "--config", str(node.config_path)])


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


RIS_EXPORT = f"""\
study_instance_uid,accession_number,report,signed_at
{HELD_UID},,Small left pleural effusion.,2026-11-02T10:00:00
,ACC-2,"Heart size is normal.
Lungs are clear.",
{UNKNOWN_UID},,No pneumothorax.,
,ACC-9,Cardiomegaly.,
{HELD_UID},,,
,,Heart size is normal.,
not-a-uid,,Heart size is normal.,
{HELD_UID},,Heart size is normal.,yesterday
{HELD_UID},,Heart size is normal.

{HELD_UID},,Newer report: small left pleural effusion.,2026-11-03
,ACC-DUP,Heart size is normal.,
"""


def test_rows_matched_unmatched_and_rejected_are_counted_and_a_reimport_adds_nothing(node, node_database, tmp_path):
    export = write(tmp_path / "ris.csv", RIS_EXPORT)
    result = run(node, "import-reports", str(export), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == {"file": "ris.csv", "rows": 11, "matched": 3, "kept_aside": 2, "already_imported": 0,
                       "rejected": {"empty report": [7], "no study_instance_uid or accession_number": [8],
                                    "study_instance_uid is not a valid UID": [9],
                                    "signed_at is not an ISO 8601 date or time": [10],
                                    "3 fields where the header has 4": [11],
                                    "accession number matches 2 studies (give the study UID)": [14]}}
    with node_database.read() as session:
        rows = {row.source_ref: row for row in session.scalars(select(SignedReport))}
        held = session.scalar(select(Study).where(Study.study_uid == HELD_UID))
        by_accession = session.scalar(select(Study).where(Study.accession_number == "ACC-2"))
        truth = ground_truth_by_study(session)
    assert set(rows) == {"ris.csv:2", "ris.csv:3", "ris.csv:5", "ris.csv:6", "ris.csv:13"}
    assert rows["ris.csv:3"].study_id == by_accession.id
    assert rows["ris.csv:3"].text == "Heart size is normal. Lungs are clear."  # a quoted field over two lines
    assert (rows["ris.csv:5"].study_id, rows["ris.csv:5"].study_uid) == (None, UNKNOWN_UID)
    assert (rows["ris.csv:6"].study_id, rows["ris.csv:6"].accession_number) == (None, "ACC-9")
    assert rows["ris.csv:2"].signed_at.isoformat() == "2026-11-02T10:00:00+00:00"
    assert truth[held.id].source_ref == "ris.csv:13", "the newest signed report is the study's ground truth"

    again = run(node, "import-reports", str(export))
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("ris.csv: 11 rows: 0 matched, 0 unmatched (kept aside until their study "
                                   "arrives), 5 already imported, 6 rejected")
    assert "  rejected, empty report: 1 (line 7)" in again.stdout
    assert "pleural" not in again.output and "Cardiomegaly" not in again.output, "no report text in the output"
    with node_database.read() as session:
        assert session.scalar(select(func.count(SignedReport.id))) == 5


def test_kept_aside_reports_are_claimed_when_their_study_arrives(node, node_database, tmp_path):
    assert run(node, "import-reports", str(write(tmp_path / "ris.csv", RIS_EXPORT))).exit_code == 0
    with node_database.session() as session:
        by_uid = add_study(session, UNKNOWN_UID)
        by_accession = add_study(session, generate_uid(), "ACC-9")
    with node_database.read() as session:
        rows = {row.source_ref: row.study_id for row in session.scalars(select(SignedReport))}
    assert (rows["ris.csv:5"], rows["ris.csv:6"]) == (by_uid.id, by_accession.id)
    assert json.loads(run(node, "quality", "--json").stdout)["kept_aside"] == 0


def test_a_kept_aside_report_is_claimed_when_a_later_instance_brings_the_accession_number(node, node_database,
                                                                                           tmp_path):
    export = write(tmp_path / "late.csv", "accession_number,report\nACC-10,Cardiomegaly.\n")
    assert json.loads(run(node, "import-reports", str(export), "--json").stdout)["kept_aside"] == 1
    with node_database.session() as session:
        study = add_study(session, generate_uid())  # its first instance has no accession number
    with node_database.read() as session:
        assert session.scalar(select(SignedReport.study_id)) is None
    with node_database.session() as session:
        add_study(session, study.study_uid, "ACC-10")
    with node_database.read() as session:
        assert session.scalar(select(SignedReport.study_id)) == study.id


@pytest.mark.parametrize(("name", "content", "encoding", "message"), [
    ("quote.csv", f'study_instance_uid,report\n{HELD_UID},Fine.\n{HELD_UID},"Open "quote" here.\n',
     "utf-8", "quote.csv line 3 is not valid CSV"),
    ("latin.csv", f"study_instance_uid,report\n{HELD_UID},Fine.\n{HELD_UID},Épanchement pleural.\n",
     "latin-1", "latin.csv line 3 is not UTF-8"),
    ("columns.csv", f"uid,text\n{HELD_UID},Fine.\n", "utf-8",
     "columns.csv line 1: the header lacks study_instance_uid or accession_number and report"),
    ("broken.jsonl", json.dumps({"study_instance_uid": HELD_UID, "report": "Fine."}) + "\n{not json\n",
     "utf-8", "broken.jsonl line 2 is not JSON"),
])
def test_a_malformed_file_imports_nothing_and_names_the_line(node, node_database, tmp_path, name, content, encoding,
                                                             message):
    result = run(node, "import-reports", str(write(tmp_path / name, content, encoding)))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "nothing imported" in result.stderr
    assert "Traceback" not in result.output
    with node_database.read() as session:
        assert session.scalar(select(func.count(SignedReport.id))) == 0


def test_jsonl_with_findings_and_impression_or_site_column_names(node, node_database, tmp_path):
    export = write(tmp_path / "ris.jsonl", "\n".join(json.dumps(row) for row in [
        {"accession_number": "ACC-2", "findings": "Heart size is normal.", "impression": "No acute disease."},
        {"StudyUID": HELD_UID, "Befund": "Small   left pleural\teffusion."},
    ]) + "\n")
    default = run(node, "import-reports", str(export), "--json")
    assert json.loads(default.stdout)["matched"] == 1
    assert json.loads(default.stdout)["rejected"] == {"no study_instance_uid or accession_number": [2]}
    renamed = run(node, "import-reports", str(export), "--study-uid-column", "StudyUID", "--report-column", "Befund",
                  "--json")
    assert json.loads(renamed.stdout)["matched"] == 1
    with node_database.read() as session:
        rows = {row.source_ref: row for row in session.scalars(select(SignedReport))}
    assert (rows["ris.jsonl:1"].findings, rows["ris.jsonl:1"].impression) == ("Heart size is normal.",
                                                                              "No acute disease.")
    assert rows["ris.jsonl:2"].text == "Small left pleural effusion."
