"""Datasets: R2Gen's annotation.json and the JSONL manifest, vocabulary, truncation, batching, clear errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from riha_model.config import RihaConfig
from riha_model.data import Collate, ReportDataset, build_tokenizer, read_studies
from riha_model.errors import RihaModelError
from riha_model.images import FRONTAL, LATERAL, OTHER_VIEW
from riha_model.text import clean_report

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repository
IU = SHARED / "iu_xray"
SIIM = SHARED / "dicom" / "siim_pneumothorax_cr_sc_jpeg.dcm"
REAL_IDS = ("CXR7_IM-2263", "CXR1900_IM-0584")
CONFIG = RihaConfig.preset("tiny", image_size=32)


@pytest.fixture(scope="module")
def real_entries() -> list[dict]:
    """The two IU-Xray studies whose images are here, as annotation.json lists them."""
    annotation = json.loads((IU / "annotation.json").read_text())
    return [entry for entry in annotation["train"] if entry["id"] in REAL_IDS]


def write_annotation(path: Path, splits: dict) -> Path:
    path.write_text(json.dumps(splits))
    return path


def write_manifest(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_annotation_json_reads_iu_xray_studies_with_two_views(tmp_path, real_entries):
    annotation = write_annotation(tmp_path / "annotation.json", {"train": real_entries, "val": real_entries[:1],
                                                                 "test": []})
    study_set = read_studies(annotation, IU / "images")
    assert study_set.dataset == "iu_xray"
    assert study_set.counts() == {"train": 2, "val": 1, "test": 0}
    study = study_set.split("train")[0]
    assert study.images == tuple(IU / "images" / path for path in real_entries[0]["image_path"])
    assert study.view_ids == (FRONTAL, LATERAL)
    with pytest.raises(RihaModelError, match=r"The 'test' split of .*annotation\.json has no studies"):
        study_set.split("test")


def test_the_full_iu_annotation_names_its_missing_images():
    """annotation.json lists 2955 studies but only two have their images here."""
    with pytest.raises(RihaModelError, match=r"5906 of 5910 image files listed in .*annotation\.json are missing "
                                             r"under .*images \(first: .*\.png\)"):
        read_studies(IU / "annotation.json", IU / "images")


def test_single_view_studies_follow_mimic_cxr_settings(tmp_path, real_entries):
    entries = [{**entry, "image_path": entry["image_path"][:1]} for entry in real_entries * 6]
    study_set = read_studies(write_annotation(tmp_path / "annotation.json", {"train": entries}), IU / "images")
    assert study_set.dataset == "mimic_cxr"
    tokenizer = build_tokenizer(study_set)
    assert tokenizer.threshold == 10 and tokenizer.dataset == "mimic_cxr"
    # Each of the two reports appears 6 times: a word of one report only (6 < 10) is unknown, of both (12) known.
    assert "the" in tokenizer.token2idx and "sternotomy" not in tokenizer.token2idx


def test_manifest_paths_are_relative_to_the_manifest_or_the_image_folder(tmp_path):
    row = {"id": "s1", "images": ["CXR7_IM-2263/0.png", "CXR7_IM-2263/1.png"], "report": "Heart normal.",
           "split": "train"}
    by_folder = read_studies(write_manifest(tmp_path / "a.jsonl", [row]), IU / "images")
    assert by_folder.split("train")[0].images[0] == IU / "images" / "CXR7_IM-2263" / "0.png"

    (tmp_path / "pictures").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "pictures" / "frontal.png")
    beside = {**row, "images": ["pictures/frontal.png", str(SIIM)]}  # relative and absolute
    study = read_studies(write_manifest(tmp_path / "b.jsonl", [beside])).split("train")[0]
    assert study.images == (tmp_path / "pictures" / "frontal.png", SIIM)
    assert study.view_ids == (FRONTAL, FRONTAL)  # the DICOM header says PA, whatever its position

    named = {**row, "views": ["lateral", 2]}
    assert read_studies(write_manifest(tmp_path / "c.jsonl", [named]), IU / "images").split("train")[0].view_ids \
        == (LATERAL, OTHER_VIEW)


@pytest.mark.parametrize("rows, message", [
    (['{"id": "a", "images": ["x.png"], "report": "r", "split": "train"}', "{not json"],
     r"m\.jsonl line 2 is not valid JSON"),
    ([{"id": "a", "images": [], "report": "r", "split": "train"}], r"line 1 has no images"),
    ([{"id": "a", "images": ["CXR7_IM-2263/0.png"], "report": "  ", "split": "train"}], r"line 1 has no report"),
    ([{"id": "a", "images": ["CXR7_IM-2263/0.png"], "report": "r", "split": "dev"}], r"line 1 has split 'dev'"),
    ([{"id": "a", "images": ["CXR7_IM-2263/0.png"], "report": "r", "split": "train", "views": ["top"]}],
     r"view 'top' is not one of"),
    ([{"id": "a", "images": ["nowhere.png"], "report": "r", "split": "train"}],
     r"1 of 1 image files listed in .*m\.jsonl are missing .*nowhere\.png"),
    ([], r"m\.jsonl lists no studies"),
], ids=["bad-json-line", "no-images", "no-report", "bad-split", "bad-view", "missing-file", "empty"])
def test_bad_manifests_get_one_clear_error(tmp_path, rows, message):
    with pytest.raises(RihaModelError, match=message):
        read_studies(write_manifest(tmp_path / "m.jsonl", rows), IU / "images")


def test_bad_files_and_folders_are_named(tmp_path):
    with pytest.raises(RihaModelError, match=r"Dataset file .*nothing\.json does not exist"):
        read_studies(tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RihaModelError, match=r"broken\.json is not valid JSON"):
        read_studies(tmp_path / "broken.json")
    write_annotation(tmp_path / "flat.json", [{"id": "a"}])
    with pytest.raises(RihaModelError, match=r"has no 'train', 'val' or 'test' list"):
        read_studies(tmp_path / "flat.json")
    write_annotation(tmp_path / "ok.json", {"train": []})
    with pytest.raises(RihaModelError, match=r"Image folder .*nope does not exist"):
        read_studies(tmp_path / "ok.json", tmp_path / "nope")


def test_examples_are_truncated_like_r2gen_and_batched_with_view_and_token_masks(tmp_path, real_entries):
    long_report = " ".join(["The lungs are clear."] * 20)  # 100 words: cut to max_seq_len ids, closing 0 lost
    rows = [{"id": "one-view", "images": ["CXR7_IM-2263/0.png"], "report": real_entries[0]["report"],
             "split": "train"},
            {"id": "two-views", "images": ["CXR1900_IM-0584/0.png", "CXR1900_IM-0584/1.png"],
             "report": long_report, "split": "train"}]
    study_set = read_studies(write_manifest(tmp_path / "m.jsonl", rows * 3), IU / "images")
    tokenizer = build_tokenizer(study_set)
    dataset = ReportDataset(study_set.split("train"), tokenizer, CONFIG)
    short, long = dataset[0], dataset[1]
    assert short.images.shape == (1, 3, 32, 32) and long.images.shape == (2, 3, 32, 32)
    assert short.token_ids == tokenizer.encode(real_entries[0]["report"])
    assert short.token_ids[0] == 0 and short.token_ids[-1] == 0
    assert len(long.token_ids) == CONFIG.max_seq_len and long.token_ids[-1] != 0
    assert long.report == clean_report(long_report)

    batch = Collate(tokenizer, CONFIG)([short, long])
    assert batch.images.shape == (2, 2, 3, 32, 32)
    assert batch.view_mask.tolist() == [[True, False], [True, True]]
    assert batch.view_ids.tolist() == [[FRONTAL, OTHER_VIEW], [FRONTAL, LATERAL]]
    assert torch.equal(batch.images[0, 1], torch.zeros(3, 32, 32))
    assert batch.tokens.shape == (2, CONFIG.max_seq_len)
    assert batch.token_mask.sum(1).tolist() == [len(short.token_ids), CONFIG.max_seq_len]
    assert batch.tokens[0, len(short.token_ids):].eq(0).all()
    assert batch.text_units.sentence.mask.sum(1).tolist()[1] == min(20, CONFIG.max_sentences)
