"""Does the `tiny` preset learn? Memorising eight studies, and reading the image on phantoms, measured.

Prints train BLEU-4 after memorising eight studies (the two real IU-Xray studies with images here plus six phantoms),
and, for a phantom set, the clinical-efficacy F1 of the trained model on held-out phantoms next to a model that
always writes the most frequent training report. On this 2-core CPU within a test's time budget the second
measurement has not yet shown the model reading the image (see docs/BENCHMARKS.md), so it is a measurement here
rather than a test.

    .venv/bin/python bench/learning.py [--studies 240] [--epochs 8] [--image-size 64] [--lr 1e-3]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from riha_model.api import evaluate_model
from riha_model.labeler import label_report
from riha_model.metrics import clinical_efficacy
from riha_model.phantoms import write_phantoms
from riha_model.text import clean_report
from riha_model.train import train_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository
REAL_IU_IDS = ("CXR7_IM-2263", "CXR1900_IM-0584")


def eight_study_manifest(folder: Path) -> Path:
    """The two real IU-Xray studies with images here, plus six phantom studies, all in the train split."""
    annotation = json.loads((SHARED / "iu_xray" / "annotation.json").read_text())
    rows = [{"id": entry["id"], "report": entry["report"], "split": "train",
             "images": [str(SHARED / "iu_xray" / "images" / path) for path in entry["image_path"]]}
            for entry in annotation["train"] if entry["id"] in REAL_IU_IDS]
    phantoms_path = write_phantoms(folder / "phantoms", 6, seed=5, image_size=64)
    phantoms = json.loads(phantoms_path.read_text())
    rows += [{"id": entry["id"], "report": entry["report"], "split": "train",
              "images": [str(phantoms_path.parent / "images" / path) for path in entry["image_path"]]}
             for split in ("train", "val", "test") for entry in phantoms[split]]
    manifest = folder / "eight.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def most_frequent_report(reports: list[str]) -> str:
    """The report a model blind to the image would write: among the training reports saying the most frequent
    thing (the most frequent set of CheXpert labels), the most frequent wording. Phantom reports vary their wording
    and sentence order, so counting whole texts alone would pick an arbitrary one."""
    def labels(report: str) -> tuple:
        return tuple(sorted(label_report(report).items()))
    most_common_labels = Counter(labels(report) for report in reports).most_common(1)[0][0]
    return Counter(report for report in reports if labels(report) == most_common_labels).most_common(1)[0][0]


def memorise_eight(folder: Path, epochs: int) -> None:
    started = time.process_time()
    result = train_model(eight_study_manifest(folder), folder / "eight.riha", preset="tiny", epochs=epochs,
                         batch_size=8, lr=1e-3, lr_step=1000, seed=0, device="cpu",
                         validate_every=max(epochs // 4, 1), val_split="train", dataset="iu_xray",
                         config_overrides={"image_size": 64})
    print(f"memorise 8 studies: train BLEU-4 {result.best_metrics['BLEU_4']:.3f} at epoch {result.best_epoch}, "
          f"{time.process_time() - started:.0f} CPU s")


def reads_the_image(folder: Path, studies: int, epochs: int, image_size: int, lr: float, batch_size: int) -> None:
    annotation_path = write_phantoms(folder / "phantoms", studies, seed=11, image_size=image_size)
    started = time.monotonic()
    result = train_model(annotation_path, folder / "phantoms.riha", preset="tiny", epochs=epochs,
                         batch_size=batch_size, lr=lr, lr_step=1000, seed=0, device="cpu", validate_every=epochs,
                         config_overrides={"image_size": image_size})
    annotation = json.loads(annotation_path.read_text())
    blind = most_frequent_report([clean_report(entry["report"]) for entry in annotation["train"]])
    references = [clean_report(entry["report"]) for entry in annotation["test"]]
    baseline = clinical_efficacy(references, [blind] * len(references))
    model = evaluate_model(result.checkpoint, annotation_path, split="test", device="cpu")["clinical_efficacy"]
    print(f"{len(annotation['train'])} training phantoms, {epochs} epochs in {time.monotonic() - started:.0f} s: "
          f"test micro F1 {model['micro_f1']:.3f} vs {baseline['micro_f1']:.3f} for the most frequent report, "
          f"macro F1 {model['macro_f1']:.3f} vs {baseline['macro_f1']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memorise-epochs", type=int, default=120)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        memorise_eight(Path(folder), args.memorise_epochs)
        reads_the_image(Path(folder), args.studies, args.epochs, args.image_size, args.lr, args.batch_size)


if __name__ == "__main__":
    main()
