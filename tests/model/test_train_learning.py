"""The tiny preset learns: it memorises a handful of studies, and on phantoms it reads the image, not only the text.

Both use PHANTOM_TRAINING (no random crop or flip, a flat 1e-3 learning rate): see riha_model/train.py. Their
bounds are on CPU time, which a busy machine does not inflate; the wall-clock timeout leaves room for that.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from riha_model.api import evaluate_model
from riha_model.labeler import label_report
from riha_model.metrics import clinical_efficacy
from riha_model.phantoms import write_phantoms
from riha_model.text import clean_report
from riha_model.train import PHANTOM_TRAINING, train_model
from tests.conftest import PhantomModel

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repository
REAL_IU_IDS = ("CXR7_IM-2263", "CXR1900_IM-0584")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def phantom_reader(tmp_path_factory) -> PhantomModel:
    """A `tiny` checkpoint that reads phantom images: PHANTOM_TRAINING on 240 studies, about three CPU-minutes.

    The set leaves out pneumothorax: it is the set docs/BENCHMARKS.md records. The recipe is near its edge (the same
    size of set without effusions did not beat the blind report), so a change of set needs measuring again.
    """
    folder = tmp_path_factory.mktemp("phantom-reader")
    image_size = PHANTOM_TRAINING["config_overrides"]["image_size"]
    annotation = write_phantoms(folder / "data", 240, seed=11, image_size=image_size, without=["pneumothorax"])
    started = time.process_time()
    result = train_model(annotation, folder / "reader.riha", validate_every=6, seed=0, device="cpu",
                         **PHANTOM_TRAINING)
    return PhantomModel(annotation=annotation, result=result, cpu_seconds=time.process_time() - started)


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


def test_tiny_preset_memorises_eight_studies(tmp_path):
    """Train BLEU-4 above 0.9 (trigram blocking off: the phantom reports repeat "there is no")."""
    manifest = eight_study_manifest(tmp_path)
    started = time.process_time()
    recipe = {**PHANTOM_TRAINING, "epochs": 120, "batch_size": 8,
              "config_overrides": {**PHANTOM_TRAINING["config_overrides"], "block_trigrams": False}}
    result = train_model(manifest, tmp_path / "eight.riha", validate_every=20, val_split="train", dataset="iu_xray",
                         seed=0, device="cpu", **recipe)
    cpu_seconds = time.process_time() - started
    print(f"memorise 8 studies: train BLEU-4 {result.best_metrics['BLEU_4']:.3f} at epoch {result.best_epoch}, "
          f"{cpu_seconds:.0f} CPU s")
    assert result.best_metrics["BLEU_4"] > 0.9
    assert cpu_seconds < 150  # about 55 s on one idle core


def most_frequent_report(reports: list[str]) -> str:
    """The report a model blind to the image would write: among the training reports saying the most frequent
    thing (the most frequent set of CheXpert labels), the most frequent wording. Phantom reports vary their wording
    and sentence order, so counting whole texts alone would pick an arbitrary one."""
    def labels(report: str) -> tuple:
        return tuple(sorted(label_report(report).items()))
    most_common_labels = Counter(labels(report) for report in reports).most_common(1)[0][0]
    return Counter(report for report in reports if labels(report) == most_common_labels).most_common(1)[0][0]


def test_trained_model_reads_the_image(phantom_reader):
    """On held-out phantoms its reports name the drawn findings better than the most frequent training report."""
    annotation = json.loads(phantom_reader.annotation.read_text())
    blind = most_frequent_report([clean_report(entry["report"]) for entry in annotation["train"]])
    references = [clean_report(entry["report"]) for entry in annotation["test"]]
    baseline = clinical_efficacy(references, [blind] * len(references))
    scores = evaluate_model(phantom_reader.result.checkpoint, phantom_reader.annotation, split="test", device="cpu")
    model = scores["clinical_efficacy"]
    print(f"{len(annotation['train'])} training phantoms, epoch {phantom_reader.result.best_epoch} of "
          f"{PHANTOM_TRAINING['epochs']} selected, {phantom_reader.cpu_seconds:.0f} CPU s: test micro F1 "
          f"{model['micro_f1']:.3f} vs {baseline['micro_f1']:.3f} for the most frequent report, macro F1 "
          f"{model['macro_f1']:.3f} vs {baseline['macro_f1']:.3f}; per observation "
          f"{ {name: round(f1, 2) for name, f1 in model['per_observation_f1'].items() if f1} }")
    assert scores["studies"] == len(references)
    # The blind report scores only on No Finding; beating it means naming findings drawn in the pixels.
    assert model["micro_f1"] > baseline["micro_f1"] + 0.05
    assert model["macro_f1"] > baseline["macro_f1"] + 0.03
    assert phantom_reader.cpu_seconds < 360  # about 170 s on one idle core
