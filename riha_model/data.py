"""Report datasets: R2Gen's annotation.json and a JSONL manifest, read into studies, tokenised, batched.

Two layouts are read:
- R2Gen's annotation.json: {"train", "val", "test"} lists of {"id", "report", "image_path": [...], "split"}, image
  paths relative to the image folder (R2Gen's --image_dir). IU-Xray lists two views per study (frontal, lateral),
  MIMIC-CXR one.
- A JSONL manifest, one study a line: {"id", "images": [...], "report", "split"} and optionally "views" (one of
  "frontal" / "lateral" / "other" or 0 / 1 / 2 per image); image paths relative to the image folder if one is given,
  else to the manifest's own folder.

Views: from "views" when given, else from the DICOM header for DICOM files, else by position (R2Gen's order: the
first image frontal, the second lateral, the rest other).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from riha_model.config import RihaConfig
from riha_model.errors import RihaModelError
from riha_model.images import FRONTAL, LATERAL, OTHER_VIEW, file_view_id, load_image, to_model_input
from riha_model.model import Batch, make_text_units
from riha_model.text import Tokenizer, clean_report

SPLITS = ("train", "val", "test")
VIEW_NAMES = {"frontal": FRONTAL, "lateral": LATERAL, "other": OTHER_VIEW}


@dataclass(frozen=True)
class TextSettings:
    """R2Gen's per-dataset vocabulary threshold and report length (in token ids, BOS included)."""

    threshold: int
    max_seq_len: int


TEXT_SETTINGS = {"iu_xray": TextSettings(threshold=3, max_seq_len=60),
                 "mimic_cxr": TextSettings(threshold=10, max_seq_len=100)}


@dataclass(frozen=True)
class Study:
    """One report with its images (absolute paths) and their view ids."""

    id: str
    images: tuple[Path, ...]
    view_ids: tuple[int, ...]
    report: str
    split: str


@dataclass(frozen=True)
class StudySet:
    """All studies of one annotation file or manifest, with the report dataset whose cleaning they follow."""

    source: Path
    dataset: str
    studies: tuple[Study, ...]

    def split(self, name: str) -> list[Study]:
        """The studies of one split; an empty split is an error, since training or evaluating on it means nothing."""
        chosen = [study for study in self.studies if study.split == name]
        if not chosen:
            present = sorted({study.split for study in self.studies})
            raise RihaModelError(f"The {name!r} split of {self.source} has no studies (splits present: "
                                 f"{', '.join(present) or 'none'}); add studies to it or choose another split.")
        return chosen

    def counts(self) -> dict[str, int]:
        return {name: sum(study.split == name for study in self.studies) for name in SPLITS}


def read_studies(data: str | os.PathLike, images: str | os.PathLike | None = None,
                 dataset: str | None = None) -> StudySet:
    """Read an annotation.json (R2Gen layout) or a .jsonl manifest; every image file must exist.

    `dataset` ("iu_xray" or "mimic_cxr") picks the report cleaning; by default IU-Xray when studies have two or more
    images, MIMIC-CXR when every study has one.
    """
    data = Path(data)
    if not data.is_file():
        raise RihaModelError(f"Dataset file {data} does not exist; pass an annotation.json or a .jsonl manifest.")
    if data.suffix.lower() == ".jsonl":
        entries = _read_manifest(data)
        image_root = Path(images) if images is not None else data.parent
        image_key = "images"
    else:
        entries = _read_annotation(data)
        image_root = Path(images) if images is not None else data.parent / "images"
        image_key = "image_path"
    if images is not None and not image_root.is_dir():
        raise RihaModelError(f"Image folder {image_root} does not exist; check --images.")

    studies = tuple(_study_from_entry(entry, where, image_key, image_root) for where, entry in entries)
    if not studies:
        raise RihaModelError(f"{data} lists no studies.")
    _check_files_exist(studies, data, image_root)
    if dataset is None:
        dataset = "mimic_cxr" if all(len(study.images) == 1 for study in studies) else "iu_xray"
    elif dataset not in TEXT_SETTINGS:
        raise RihaModelError(f"Unknown report dataset {dataset!r}; use one of {', '.join(TEXT_SETTINGS)}.")
    return StudySet(source=data, dataset=dataset, studies=studies)


def _read_annotation(path: Path) -> list[tuple[str, dict]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RihaModelError(f"{path} is not valid JSON ({exc}); expected R2Gen's annotation.json layout.") from exc
    if not isinstance(content, dict) or not any(isinstance(content.get(name), list) for name in SPLITS):
        raise RihaModelError(f"{path} has no 'train', 'val' or 'test' list; expected R2Gen's annotation.json layout.")
    entries = []
    for name in SPLITS:
        for position, entry in enumerate(content.get(name) or []):
            if isinstance(entry, dict):
                entry = {**entry, "split": name}  # the list an entry sits in is its split, as in R2Gen
            entries.append((f"{path} {name}[{position}]", entry))
    return entries


def _read_manifest(path: Path) -> list[tuple[str, dict]]:
    entries = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RihaModelError(f"{path} line {number} is not valid JSON ({exc.msg}); each line must be one "
                                     "object with id, images, report and split.") from exc
    return entries


def _study_from_entry(entry: object, where: str, image_key: str, image_root: Path) -> Study:
    if not isinstance(entry, dict):
        raise RihaModelError(f"{where} is not a JSON object with id, {image_key}, report and split.")
    images = entry.get(image_key)
    if isinstance(images, str):
        images = [images]
    if not images or not isinstance(images, list) or not all(isinstance(item, str) and item for item in images):
        raise RihaModelError(f"{where} has no images: '{image_key}' must be a non-empty list of file paths.")
    report = entry.get("report")
    if not isinstance(report, str) or not report.strip():
        raise RihaModelError(f"{where} has no report text: 'report' must be a non-empty string.")
    split = entry.get("split")
    if split not in SPLITS:
        raise RihaModelError(f"{where} has split {split!r}; use one of {', '.join(SPLITS)}.")
    paths = tuple(image_root / image for image in images)  # an absolute image path stays as it is
    return Study(id=str(entry.get("id", where)), images=paths, view_ids=_view_ids(entry.get("views"), paths, where),
                 report=report, split=split)


def _view_ids(views: object, paths: Sequence[Path], where: str) -> tuple[int, ...]:
    if views is None:
        return tuple(file_view_id(path, position) for position, path in enumerate(paths))
    if not isinstance(views, list) or len(views) != len(paths):
        raise RihaModelError(f"{where}: 'views' must list one view per image ({len(paths)}).")
    ids = []
    for view in views:
        view_id = VIEW_NAMES.get(view) if isinstance(view, str) else view
        if view_id not in VIEW_NAMES.values():
            raise RihaModelError(f"{where}: view {view!r} is not one of frontal, lateral, other (or 0, 1, 2).")
        ids.append(view_id)
    return tuple(ids)


def _check_files_exist(studies: Sequence[Study], data: Path, image_root: Path) -> None:
    missing = [path for study in studies for path in study.images if not path.is_file()]
    if missing:
        total = sum(len(study.images) for study in studies)
        raise RihaModelError(f"{len(missing)} of {total} image files listed in {data} are missing under {image_root} "
                             f"(first: {missing[0]}); check --images or remove those studies.")


def build_tokenizer(study_set: StudySet) -> Tokenizer:
    """R2Gen's vocabulary from the training split's reports with the dataset's threshold (IU 3, MIMIC 10)."""
    reports = [study.report for study in study_set.split("train")]
    return Tokenizer.build(reports, threshold=TEXT_SETTINGS[study_set.dataset].threshold, dataset=study_set.dataset)


@dataclass
class Example:
    """One study ready for batching: its views as model input, the truncated token ids and the cleaned report."""

    images: torch.Tensor  # [V, 3, S, S]
    view_ids: list[int]
    token_ids: list[int]
    report: str


class ReportDataset(Dataset):
    """Studies as model examples; images are decoded on access (augment: R2Gen's random crop and flip)."""

    def __init__(self, studies: Sequence[Study], tokenizer: Tokenizer, config: RihaConfig, augment: bool = False):
        self.studies = list(studies)
        self.tokenizer = tokenizer
        self.config = config
        self.augment = augment

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> Example:
        study = self.studies[index]
        images = torch.stack([to_model_input(load_image(path), self.config.image_size, train=self.augment)
                              for path in study.images])
        # R2Gen keeps the first max_seq_len ids of [0] + report + [0]: a long report loses its closing 0.
        token_ids = self.tokenizer.encode(study.report, max_length=self.config.max_seq_len)
        return Example(images=images, view_ids=list(study.view_ids), token_ids=token_ids,
                       report=clean_report(study.report, self.tokenizer.dataset))


class Collate:
    """Examples -> model.Batch: views padded to the batch's most (view_mask), tokens 0-padded (token_mask)."""

    def __init__(self, tokenizer: Tokenizer, config: RihaConfig):
        self.tokenizer = tokenizer
        self.config = config

    def __call__(self, examples: Sequence[Example]) -> Batch:
        images, view_mask, view_ids = pad_views([example.images for example in examples],
                                                [example.view_ids for example in examples])
        length = max(len(example.token_ids) for example in examples)
        tokens = torch.zeros(len(examples), length, dtype=torch.long)
        token_mask = torch.zeros(len(examples), length, dtype=torch.bool)
        for row, example in enumerate(examples):
            tokens[row, :len(example.token_ids)] = torch.tensor(example.token_ids)
            token_mask[row, :len(example.token_ids)] = True
        text_units = make_text_units([example.report for example in examples], self.tokenizer, self.config)
        return Batch(images=images, view_mask=view_mask, view_ids=view_ids, tokens=tokens, token_mask=token_mask,
                     text_units=text_units)


def pad_views(views: Sequence[torch.Tensor], view_ids: Sequence[Sequence[int]]):
    """Per-study [V_i, 3, S, S] tensors -> images [B, V, 3, S, S], view_mask [B, V], view_ids [B, V] (padding views:
    zeros, other)."""
    most = max(len(study) for study in views)
    size = views[0].shape[-1]
    images = torch.zeros(len(views), most, 3, size, size)
    mask = torch.zeros(len(views), most, dtype=torch.bool)
    ids = torch.full((len(views), most), OTHER_VIEW, dtype=torch.long)
    for row, (study, study_view_ids) in enumerate(zip(views, view_ids)):
        images[row, :len(study)] = study
        mask[row, :len(study)] = True
        ids[row, :len(study)] = torch.tensor(list(study_view_ids), dtype=torch.long)
    return images, mask, ids
