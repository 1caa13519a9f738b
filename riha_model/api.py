"""The narrow surface riha_node uses: load a checkpoint once, turn studies' pixel arrays into report texts; train,
fine-tune and evaluate.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from riha_model.checkpoint import load_checkpoint
from riha_model.config import RihaConfig
from riha_model.data import pad_views
from riha_model.errors import RihaModelError
from riha_model.images import OTHER_VIEW, to_model_input
from riha_model.text import Tokenizer, split_sentences
from riha_model.train import PHANTOM_TRAINING, TrainResult, autocast, evaluate_model, resolve_device, train_model
from riha_model.train import state_path as training_state_path

__all__ = ["PHANTOM_TRAINING", "ReportModel", "TrainResult", "evaluate_model", "readable_report", "train_model",
           "training_state_path"]


class ReportModel:
    """A checkpoint loaded once for generation: `generate_reports` drafts one report per study in one batched pass."""

    def __init__(self, checkpoint_path: str | os.PathLike, device: str = "auto"):
        self.device = resolve_device(device)
        loaded = load_checkpoint(checkpoint_path, map_location=self.device)
        self.model = loaded.model.eval()
        self.config: RihaConfig = loaded.config
        self.tokenizer = Tokenizer.from_dict(loaded.tokenizer)
        self.sha256: str = loaded.sha256
        self.metadata: dict = loaded.metadata
        self.metrics: dict = loaded.metrics
        self.path = loaded.path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> ReportModel:
        return cls(path, device)

    @property
    def version(self) -> str:
        """A short, stable name for this model: preset and the first 12 hex digits of the file's SHA-256."""
        return f"riha-{self.metadata.get('preset') or 'custom'}-{self.sha256[:12]}"

    def generate_reports(self, studies: Sequence[Sequence[np.ndarray]],
                         view_ids: Sequence[Sequence[int]] | None = None) -> list[str]:
        """One readable report per study from its images (float32 HxW arrays in [0, 1], already windowed).

        `view_ids` per image: 0 frontal, 1 lateral, 2 other; by default the first image is taken as frontal, the
        second as lateral (R2Gen's order), any further one as other.
        """
        if not studies:
            return []
        if view_ids is None:
            view_ids = [[min(position, OTHER_VIEW) for position in range(len(study))] for study in studies]
        if len(view_ids) != len(studies) or any(len(ids) != len(study) for ids, study in zip(view_ids, studies)):
            raise RihaModelError("view_ids must give one view id per image of every study.")
        for number, study in enumerate(studies):
            if not len(study):
                raise RihaModelError(f"Study {number} of the batch has no image; every study needs at least one.")
        views = [torch.stack([to_model_input(np.asarray(image, dtype=np.float32), self.config.image_size)
                              for image in study]) for study in studies]
        images, view_mask, view_tensor = pad_views(views, view_ids)
        with torch.inference_mode(), autocast(self.device):
            generated = self.model.generate(images.to(self.device), view_mask.to(self.device),
                                            view_tensor.to(self.device))
        return [readable_report(self.tokenizer.decode(ids)) for ids in generated]


def readable_report(decoded: str) -> str:
    """R2Gen's lower-case ' . '-separated tokens as sentences: "the heart is normal . no effusion ." ->
    "The heart is normal. No effusion."."""
    return " ".join(sentence[:1].upper() + sentence[1:] + "." for sentence in split_sentences(decoded))
