"""`riha-node phantoms` and `riha-node label`: synthetic studies for tests and the demo, and CheXpert labels for
report CSVs. Every user error ends as one line and a non-zero exit."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click

from riha_model.errors import RihaModelError
from riha_model.labeler import OBSERVATIONS, label_report
from riha_model.phantoms import write_phantoms


@click.command(name="phantoms")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write images/, annotation.json and (with --dicom) dicom/ into.")
@click.option("--studies", required=True, type=click.IntRange(min=3), help="Number of studies (3 or more).")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed writes the same studies.")
@click.option("--dicom", is_flag=True, help="Also write each study as DICOM CR files (PA and lateral).")
@click.option("--image-size", type=click.IntRange(min=32), default=256, show_default=True,
              help="Width and height of every view in pixels.")
@click.option("--without", multiple=True, metavar="FINDING",
              help="A finding never to draw (repeatable), e.g. pneumothorax: data a model has never seen it in.")
def phantoms(out: Path, studies: int, seed: int, dicom: bool, image_size: int, without: tuple[str, ...]) -> None:
    """Synthetic chest phantom studies with known findings and matching reports."""
    try:
        annotation = write_phantoms(out, studies, seed=seed, dicom=dicom, image_size=image_size, progress=True,
                                    without=without)
    except (RihaModelError, OSError) as exc:
        raise click.ClickException(f"Cannot write phantoms to {out}: {exc}") from exc
    counts = {split: len(entries) for split, entries in json.loads(annotation.read_text()).items()}
    click.echo(f"wrote {studies} phantom studies to {out}: "
               + ", ".join(f"{split} {count}" for split, count in counts.items()))
    click.echo(f"annotation {annotation}")
    click.echo(f"images     {out / 'images'}")
    if dicom:
        click.echo(f"dicom      {out / 'dicom'}")


def _chexpert_value(label: int | None) -> str:
    return "" if label is None else f"{float(label):.1f}"


@click.command(name="label")
@click.option("--csv", "csv_path", required=True, type=click.Path(path_type=Path), help="CSV file with a header row.")
@click.option("--text-column", required=True, help="Column holding the report text.")
@click.option("--id-column", help="Column to copy into the output as the row's id (default: the row number).")
def label(csv_path: Path, text_column: str, id_column: str | None) -> None:
    """The 14 CheXpert observations of every report, as CSV on stdout (1.0, 0.0, -1.0 uncertain, blank)."""
    if not csv_path.is_file():
        raise click.ClickException(f"CSV file {csv_path} does not exist; pass an existing file to --csv.")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for wanted in (text_column, id_column):
            if wanted is not None and wanted not in columns:
                raise click.ClickException(f"Column {wanted!r} is not in {csv_path}; its columns are "
                                           f"{', '.join(columns) or 'none'}.")
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([id_column or "row", *OBSERVATIONS])
        for number, row in enumerate(reader, start=1):
            labels = label_report(row[text_column] or "")
            writer.writerow([row[id_column] if id_column else number,
                             *(_chexpert_value(labels[name]) for name in OBSERVATIONS)])


COMMANDS = [phantoms, label]
