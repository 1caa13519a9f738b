"""RIHA done the reference code's way, as the baseline of bench/model.py.

It is riha_model's RIHA with the three parts that the reference computes differently swapped back:
- the visual pyramid projects every ResNet stage to 2048 channels at full resolution (256 -> 2048 on the 56x56
  layer1 map), then averages down to the 7x7 grid, then embeds 2048 -> d_model as R2Gen's att_embed does;
- the alignment solves one OT problem per study in a Python loop with POT (`ot.unbalanced.sinkhorn_unbalanced`);
- decoding re-decodes the whole prefix at every step: the relational memory is run again from its first token and
  the cross-attention keys/values over the visual tokens are projected again (riha_model's `use_cache=False`).
Everything else (ResNet, encoder, decoder, text pyramid, beam search) is the same code, so the comparison measures
only those three choices. The beam search is riha_model's batched one on both sides, which flatters the reference.
"""
from __future__ import annotations

import numpy as np
import ot
import torch
from torch import Tensor, nn

from riha_model.config import TEXT_LEVELS, RihaConfig
from riha_model.model import RIHA, HierarchicalAlignment, VisualFeaturePyramid, VisualFeatures, _resample

REFERENCE_VISUAL_WIDTH = 2048


class ReferenceVisualPyramid(VisualFeaturePyramid):
    """Project at full resolution to 2048 channels, then pool, then embed to d_model."""

    def __init__(self, config: RihaConfig):
        super().__init__(config, pretrained=False)
        widths = [conv.in_channels for conv in self.project]
        self.project = nn.ModuleList([nn.Conv2d(width, REFERENCE_VISUAL_WIDTH, kernel_size=1) for width in widths])
        self.view_embed = nn.Embedding(self.view_embed.num_embeddings, REFERENCE_VISUAL_WIDTH)
        self.att_embed = nn.Sequential(nn.Linear(REFERENCE_VISUAL_WIDTH, config.d_model), nn.ReLU(),
                                       nn.Dropout(config.dropout))

    def level_maps(self, images: Tensor) -> list[Tensor]:
        x, maps = self.stem(images), []
        for stage, project in zip(self.stages, self.project):
            x = stage(x)
            maps.append(_resample(project(x), self.grid_size))
        return maps

    def forward(self, images: Tensor, view_mask: Tensor, view_ids: Tensor) -> VisualFeatures:
        features = super().forward(images, view_mask, view_ids)
        return VisualFeatures(tokens=self.att_embed(features.tokens), mask=features.mask, levels=features.levels)


class ReferenceAlignment(HierarchicalAlignment):
    """One POT call per study and level."""

    def __init__(self, config: RihaConfig, text_dim: int):
        super().__init__(config, text_dim)
        self.visual_proj = nn.ModuleDict({level: nn.Linear(REFERENCE_VISUAL_WIDTH, config.cha_dim)
                                          for level in TEXT_LEVELS})

    def transport_cost(self, x: Tensor, x_mask: Tensor, y: Tensor, y_mask: Tensor) -> Tensor:
        losses = []
        for i in range(x.shape[0]):
            xi, yi = x[i][x_mask[i]], y[i][y_mask[i]]
            n, m = xi.shape[0], yi.shape[0]
            if n == 0 or m == 0:
                continue
            cost = torch.cdist(xi, yi) ** 2
            normalised = (cost / cost.max()).detach().cpu().double().numpy()
            plan = ot.unbalanced.sinkhorn_unbalanced(np.full(n, 1 / n), np.full(m, 1 / m), normalised,
                                                     self.config.sinkhorn_reg, self.config.sinkhorn_reg_m)
            losses.append((cost * torch.from_numpy(plan).to(cost)).sum() / (n * m))
        return torch.stack(losses).mean() if losses else x.new_zeros(())


class ReferenceRIHA(RIHA):
    """RIHA with the reference's pyramid, per-study OT loop and uncached decoding."""

    def __init__(self, config: RihaConfig, vocab_size: int):
        super().__init__(config, vocab_size, pretrained=False)
        self.vfp = ReferenceVisualPyramid(config)
        self.cha = ReferenceAlignment(config, self.tfp.out_dim)

    def generate(self, images, view_mask, view_ids, beam_size=None, max_len=None, block_trigrams=None,
                 use_cache=False):
        return super().generate(images, view_mask, view_ids, beam_size, max_len, block_trigrams, use_cache=False)
