"""Agreement of riha_model.labeler with the MeSH / Problems codes NLM coders gave the IU-Xray reports.

The codes were assigned by people, independently of any labeler, so they are a fair check of the rules. Each report's
findings and impression are labelled; an observation counts as positive when the labeler says 1 (uncertain counts
as negative, as in clinical efficacy). The baseline, measured in the same run, is a bare keyword match (any mention
phrase is positive, no negation or uncertainty), which shows what the scope rules buy.

    .venv/bin/python bench/labeler.py [--csv ../shared/data/iu_xray/indiana_reports_dev.csv]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from riha_model.labeler import POSITIVE, UNCERTAIN, label_report, mentioned_observations

DEFAULT_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "iu_xray" / "indiana_reports_dev.csv"

# Observation -> MeSH main headings (text before the first "/") that mean it; (heading, qualifier) pairs when only
# a qualified use means it.
MESH_TERMS: dict[str, tuple[str | tuple[str, str], ...]] = {
    "No Finding": ("normal",),
    "Cardiomegaly": ("Cardiomegaly", ("Cardiac Shadow", "enlarged")),
    "Pleural Effusion": ("Pleural Effusion", "Hydropneumothorax"),
    "Pneumothorax": ("Pneumothorax", "Hydropneumothorax"),
    "Edema": ("Pulmonary Edema",),
    "Consolidation": ("Consolidation",),
    "Atelectasis": ("Pulmonary Atelectasis",),
    "Fracture": ("Fractures, Bone",),
    "Lung Opacity": ("Opacity", "Airspace Disease", "Infiltrate", "Density"),
    "Lung Lesion": ("Nodule", "Mass"),
    "Pneumonia": ("Pneumonia",),
    "Support Devices": ("Catheters, Indwelling", "Tube, Inserted", "Implanted Medical Device", "Medical Device",
                        "Stents"),
}
TARGETS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "No Finding")


def mesh_positive(mesh: str, observation: str) -> bool:
    for code in mesh.split(";"):
        heading, *qualifiers = [part.strip() for part in code.split("/")]
        for term in MESH_TERMS[observation]:
            if (term == heading) if isinstance(term, str) else (term[0] == heading and term[1] in qualifiers):
                return True
    return False


def coded_reports(csv_path: Path) -> list[tuple[str, str]]:
    """(report text, MeSH codes) of the reports the coders indexed and that have findings or an impression."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    reports = [(f"{row['findings']} {row['impression']}".strip(), row["MeSH"]) for row in rows]
    return [(text, mesh) for text, mesh in reports if text and mesh.strip() and mesh.strip() != "No Indexing"]


def _scores(predicted: list[bool], truth: list[bool]) -> dict[str, float]:
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}


def agreement(csv_path: Path = DEFAULT_CSV) -> dict[str, dict[str, float]]:
    """Per observation: the labeler's precision, recall, F1 against the codes, F1 with uncertain counted as
    positive, and the keyword baseline's F1."""
    reports = coded_reports(csv_path)
    labels = [label_report(text) for text, _ in reports]
    keywords = [mentioned_observations(text) for text, _ in reports]
    table = {}
    for observation in MESH_TERMS:
        truth = [mesh_positive(mesh, observation) for _, mesh in reports]
        row = _scores([label[observation] == POSITIVE for label in labels], truth)
        row["f1_uncertain_positive"] = _scores(
            [label[observation] in (POSITIVE, UNCERTAIN) for label in labels], truth)["f1"]
        if observation == "No Finding":  # the baseline: no mention of any of the other 13 observations
            baseline = [not (found - {"Support Devices"}) for found in keywords]
        else:
            baseline = [observation in found for found in keywords]
        row["baseline_f1"] = _scores(baseline, truth)["f1"]
        table[observation] = row
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args()
    started = time.perf_counter()
    table = agreement(args.csv)
    seconds = time.perf_counter() - started
    print(f"{len(coded_reports(args.csv))} coded reports, labelled in {seconds:.1f} s (both labelers)")
    print("| observation | MeSH positives | precision | recall | F1 | F1 (uncertain = positive) | keyword F1 "
          "| F1 ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for observation, row in table.items():
        ratio = row["f1"] / row["baseline_f1"] if row["baseline_f1"] else float("inf")
        print(f"| {observation} | {row['support']} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | "
              f"{row['f1_uncertain_positive']:.3f} | {row['baseline_f1']:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
