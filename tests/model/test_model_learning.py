"""The tiny model learns: a few studies are memorised, report for report, in a bounded number of steps."""
from __future__ import annotations

import torch

from tests.model.test_model_forward import make_batch, make_model


def test_tiny_model_memorises_four_studies():
    model = make_model(seed=0, dropout=0.0)
    batch = make_batch([2, 1, 2, 2], seed=20, config=model.config)
    optimizer = torch.optim.Adam([{"params": list(model.backbone_parameters()), "lr": 5e-4},
                                  {"params": list(model.head_parameters()), "lr": 1e-3}])
    first = None
    for _ in range(40):
        out = model(batch)
        first = first if first is not None else out["lm_loss"].item()
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    assert out["lm_loss"] < 0.1 * first
    assert out["cha_guard"] < 0.5  # the alignment did not collapse the projections
    references = [batch.tokens[i][batch.token_mask[i]][1:-1].tolist() for i in range(4)]
    # no trigram blocking: some of these real reports repeat a trigram ("there is no ... there is no")
    generated = model.eval().generate(batch.images, batch.view_mask, batch.view_ids, block_trigrams=False)
    assert sum(ids == reference for ids, reference in zip(generated, references)) >= 3
