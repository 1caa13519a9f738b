"""`riha-node import-reports` and `riha-node quality`: signed reports from a RIS export, and how drafts compare.

An import is all or nothing at the file level: a file that cannot be read as a whole (wrong encoding, broken CSV
quoting, a line that is not JSON, a header without the needed columns) imports nothing and names the line. Rows
that can be read but not used (no match key, empty report, bad date, ...) are rejected one by one, counted by
reason with their line numbers, and the rest is imported in one transaction. Each row is stored under
"FILE:LINE", so importing the same file again adds nothing. No report text reaches the output or the log.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click
from sqlalchemy.orm import Session

from riha_node.cli_common import config_option, load_configured, open_existing_database
from riha_node.errors import UserError
from riha_node.ground_truth import SOURCE_IMPORT, SignedText, add_signed_report, already_recorded, matching_studies
from riha_node.log import get_logger
from riha_node.storage import valid_uid

log = get_logger(__name__)


class MalformedFile(UserError):
    """The import file cannot be read as a whole; nothing was imported."""


@dataclass(frozen=True)
class Columns:
    """Column names (CSV header or JSON keys) of a RIS export."""

    study_uid: str = "study_instance_uid"
    accession: str = "accession_number"
    report: str = "report"
    findings: str = "findings"
    impression: str = "impression"
    signed_at: str = "signed_at"


@dataclass(frozen=True)
class ImportRow:
    line: int
    study_uid: str | None
    accession_number: str | None
    signed: SignedText


@dataclass
class ImportSummary:
    file: str
    rows: int = 0
    matched: int = 0
    kept_aside: int = 0
    already_imported: int = 0
    rejected: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def reject(self, line: int, reason: str) -> None:
        self.rejected[reason].append(line)

    def as_dict(self) -> dict:
        return {"file": self.file, "rows": self.rows, "matched": self.matched, "kept_aside": self.kept_aside,
                "already_imported": self.already_imported, "rejected": dict(self.rejected)}


def read_report_file(path: Path, columns: Columns, summary: ImportSummary) -> list[ImportRow]:
    """Every usable row of a .csv or .jsonl file; unusable rows go to `summary.rejected`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise MalformedFile(f"{path} line {line} is not UTF-8 ({exc.reason}); nothing imported. Save the export as "
                            "UTF-8 and import it again.") from None
    if path.suffix.lower() == ".csv":
        records = _csv_records(path, text, columns)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        records = _jsonl_records(path, text)
    else:
        raise UserError(f"{path} is neither .csv nor .jsonl; export the reports as one of those.")
    rows = []
    for line, record in records:
        summary.rows += 1
        row = _row(line, record, columns, summary)
        if row is not None:
            rows.append(row)
    return rows


def _csv_records(path: Path, text: str, columns: Columns):
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise MalformedFile(f"{path} is empty; nothing imported.") from None
    except csv.Error as exc:
        raise MalformedFile(f"{path} line 1 is not valid CSV ({exc}); nothing imported.") from None
    missing = []
    if columns.study_uid not in header and columns.accession not in header:
        missing.append(f"{columns.study_uid} or {columns.accession}")
    if not {columns.report, columns.findings, columns.impression} & set(header):
        missing.append(f"{columns.report} (or {columns.findings} and {columns.impression})")
    if missing:
        raise MalformedFile(f"{path} line 1: the header lacks {' and '.join(missing)} (it has "
                            f"{', '.join(header) or 'no columns'}); nothing imported. Name the columns with "
                            "--study-uid-column, --accession-column, --report-column.")
    records = []
    while True:
        line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return records
        except csv.Error as exc:
            raise MalformedFile(f"{path} line {reader.line_num} is not valid CSV ({exc}); nothing imported. Fix "
                                "the quoting there and import the file again.") from None
        if not any(value.strip() for value in record):
            continue
        if len(record) != len(header):
            records.append((line, f"{len(record)} fields where the header has {len(header)}"))
        else:
            records.append((line, dict(zip(header, record))))


def _jsonl_records(path: Path, text: str):
    records = []
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            record = json.loads(content)
        except json.JSONDecodeError as exc:
            raise MalformedFile(f"{path} line {line} is not JSON ({exc.msg}); nothing imported. Fix that line and "
                                "import the file again.") from None
        if not isinstance(record, dict):
            raise MalformedFile(f"{path} line {line} is not a JSON object; nothing imported. Each line must be "
                                "one report as an object.")
        records.append((line, record))
    return records


def _row(line: int, record: dict | str, columns: Columns, summary: ImportSummary) -> ImportRow | None:
    """One usable row, or None after recording why it is rejected."""
    if isinstance(record, str):
        summary.reject(line, record)
        return None
    values = {}
    for name in (columns.study_uid, columns.accession, columns.report, columns.findings, columns.impression,
                 columns.signed_at):
        value = record.get(name)
        if isinstance(value, bool) or (value is not None and not isinstance(value, (str, int))):
            summary.reject(line, f"{name} is not text")
            return None
        values[name] = str(value).strip() if value is not None else ""
    study_uid, accession = values[columns.study_uid] or None, values[columns.accession] or None
    if study_uid is None and accession is None:
        reason = f"no {columns.study_uid} or {columns.accession}"
    elif study_uid is not None and not valid_uid(study_uid):
        reason = f"{columns.study_uid} is not a valid UID"
    elif accession is not None and len(accession) > 64:
        reason = f"{columns.accession} is longer than 64 characters"
    elif not (values[columns.report] or values[columns.findings] or values[columns.impression]):
        reason = "empty report"
    else:
        try:
            signed_at = _timestamp(values[columns.signed_at])
        except ValueError:
            summary.reject(line, f"{columns.signed_at} is not an ISO 8601 date or time")
            return None
        findings = values[columns.report] or values[columns.findings] or None
        impression = None if values[columns.report] else values[columns.impression] or None
        return ImportRow(line, study_uid, accession, SignedText(findings, impression, signed_at))
    summary.reject(line, reason)
    return None


def _timestamp(value: str) -> datetime | None:
    """ISO 8601 date or date and time; without a zone it is taken as UTC."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def import_rows(session: Session, rows: list[ImportRow], summary: ImportSummary) -> None:
    """Store every row not stored before, matched to its study or kept aside; one transaction (the caller's)."""
    for row in rows:
        source_ref = f"{summary.file}:{row.line}"
        earlier = already_recorded(session, source_ref)
        if earlier is not None:
            if earlier.text == row.signed.text:
                summary.already_imported += 1
            else:
                summary.reject(row.line, "a file of this name was imported before with another report on this "
                                         "line (rename the file to import it)")
            continue
        studies = matching_studies(session, row.study_uid, row.accession_number)
        if len(studies) > 1:
            summary.reject(row.line, f"accession number matches {len(studies)} studies (give the study UID)")
            continue
        add_signed_report(session, row.signed, study=studies[0] if studies else None, study_uid=row.study_uid,
                          accession_number=row.accession_number, source=SOURCE_IMPORT, source_ref=source_ref)
        if studies:
            summary.matched += 1
        else:
            summary.kept_aside += 1


@click.command(name="import-reports")
@config_option
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--study-uid-column", default=Columns.study_uid, show_default=True,
              help="Column with the StudyInstanceUID (matched first).")
@click.option("--accession-column", default=Columns.accession, show_default=True,
              help="Column with the accession number (matched when the UID is absent or unknown).")
@click.option("--report-column", default=Columns.report, show_default=True, help="Column with the whole report.")
@click.option("--findings-column", default=Columns.findings, show_default=True,
              help="Column with the findings (used when there is no report column).")
@click.option("--impression-column", default=Columns.impression, show_default=True,
              help="Column with the impression.")
@click.option("--signed-at-column", default=Columns.signed_at, show_default=True,
              help="Column with the signing time (ISO 8601; UTC when it has no zone). Optional.")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
def import_reports(config_path: Path | None, file: Path, study_uid_column: str, accession_column: str,
                   report_column: str, findings_column: str, impression_column: str, signed_at_column: str,
                   as_json: bool) -> None:
    """Import signed reports from a RIS export (FILE.csv or FILE.jsonl) as ground truth."""
    from riha_node.quality import update_quality

    config = load_configured(config_path)
    columns = Columns(study_uid_column, accession_column, report_column, findings_column, impression_column,
                      signed_at_column)
    summary = ImportSummary(file=file.name)
    rows = read_report_file(file, columns, summary)
    database = open_existing_database(config)
    with database.session() as session:
        import_rows(session, rows, summary)
    update_quality(database)  # each matched study with a delivered draft: how far the signed report moved from it
    rejected = sum(len(lines) for lines in summary.rejected.values())
    log.info("signed reports imported", rows=summary.rows, matched=summary.matched, kept_aside=summary.kept_aside,
             already_imported=summary.already_imported, rejected=rejected)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
        return
    click.echo(f"{summary.file}: {summary.rows} rows: {summary.matched} matched, {summary.kept_aside} unmatched (kept "
               f"aside until their study arrives), {summary.already_imported} already imported, {rejected} rejected")
    for reason, lines in sorted(summary.rejected.items()):
        click.echo(f"  rejected, {reason}: {len(lines)} (line{'s' if len(lines) > 1 else ''} "
                   f"{', '.join(map(str, lines))})")


@click.command(name="quality")
@config_option
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Only drafts written on or after this date (YYYY-MM-DD, UTC).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def quality(config_path: Path | None, since: datetime | None, as_json: bool) -> None:
    """How far signed reports moved from the drafts, by model version and month (BLEU-4, ROUGE-L, CE)."""
    from riha_node.quality import summarise, update_quality

    config = load_configured(config_path)
    database = open_existing_database(config)
    update_quality(database)
    with database.read() as session:
        summary = summarise(session, since.replace(tzinfo=timezone.utc) if since else None)
    log.info("quality summarised", studies=sum(g["studies"] for g in summary["groups"]),
             kept_aside=summary["kept_aside"])
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if summary["groups"]:
        click.echo(f"{'model version':<24} {'month':<8} {'studies':>7} {'BLEU-4':>7} {'ROUGE-L':>7} {'CE agree':>8} "
                   f"{'CE F1':>6}")
    for group in summary["groups"]:
        click.echo(f"{group['model_version']:<24} {group['month']:<8} {group['studies']:>7} {group['bleu_4']:>7.4f} "
                   f"{group['rouge_l']:>7.4f} {group['ce_agreement']:>8.4f} {group['ce_micro_f1']:>6.4f}")
    if not summary["groups"]:
        click.echo("no study has both a delivered draft and a signed report yet")
    click.echo(f"signed reports {summary['signed_reports']}: {summary['studies_with_ground_truth']} studies with "
               f"ground truth ({summary['studies_without_delivered_draft']} without a draft delivered before "
               f"signing), {summary['kept_aside']} kept aside (no matching study yet)")


COMMANDS = [import_reports, quality]
