"""CHA's optimal transport: the batched Sinkhorn against POT, the batched loss against a per-study loop, collapse."""
from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from riha_model.model import HierarchicalAlignment, collapse_penalty, squared_distances, unit_spread
from riha_model.ot import sinkhorn_unbalanced_batch, uniform_marginals
from tests.model.test_model_forward import make_batch, make_model, tiny_config  # noqa: F401

REG, REG_M = 0.1, 0.5


def padded_problems(seed: int = 0):
    """Five cost matrices with different real sizes inside a [5, 20, 9] padding."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.tensor([20, 5, 13, 1, 20]), torch.tensor([9, 3, 1, 9, 6])
    row_mask = torch.arange(20)[None] < rows[:, None]
    col_mask = torch.arange(9)[None] < cols[:, None]
    cost = torch.rand(5, 20, 9, generator=generator, dtype=torch.float64)
    return cost / cost.amax((1, 2), keepdim=True), row_mask, col_mask


def test_batched_unbalanced_plans_equal_pot_per_problem():
    cost, row_mask, col_mask = padded_problems()
    plans = sinkhorn_unbalanced_batch(uniform_marginals(row_mask), uniform_marginals(col_mask), cost, REG, REG_M)
    for i in range(cost.shape[0]):
        n, m = int(row_mask[i].sum()), int(col_mask[i].sum())
        expected = ot.unbalanced.sinkhorn_unbalanced(np.full(n, 1 / n), np.full(m, 1 / m), cost[i, :n, :m].numpy(),
                                                     REG, REG_M)
        np.testing.assert_allclose(plans[i, :n, :m].numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(plans[i].sum(1)[:n].numpy(), expected.sum(1), rtol=1e-9)  # marginals
        np.testing.assert_allclose(plans[i].sum(0)[:m].numpy(), expected.sum(0), rtol=1e-9)
        assert plans[i, n:].abs().sum() == 0 and plans[i, :, m:].abs().sum() == 0
        assert plans[i].sum() < 1  # unbalanced: the relaxed marginals give up mass on a costly transport


def test_the_balanced_limit_meets_both_marginals():
    cost, row_mask, col_mask = padded_problems(seed=1)
    a, b = uniform_marginals(row_mask), uniform_marginals(col_mask)
    plans = sinkhorn_unbalanced_batch(a, b, cost, REG, float("inf"), max_iter=5000, tol=1e-12)
    torch.testing.assert_close(plans.sum(2), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(plans.sum(1), b, rtol=0, atol=1e-6)
    reference = ot.sinkhorn(a[0].numpy(), b[0].numpy(), cost[0].numpy(), REG, stopThr=1e-12, numItermax=5000)
    np.testing.assert_allclose(plans[0].numpy(), reference, atol=1e-8)


def test_batched_alignment_loss_and_gradient_equal_a_per_study_loop_with_pot():
    config = tiny_config()
    torch.manual_seed(0)
    cha = HierarchicalAlignment(config, text_dim=config.text_dim).double()
    generator = torch.Generator().manual_seed(1)
    visual = torch.randn(4, 12, config.d_model, generator=generator, dtype=torch.float64)
    text = torch.randn(4, 5, config.text_dim, generator=generator, dtype=torch.float64)
    visual_mask = torch.arange(12)[None] < torch.tensor([12, 4, 8, 12])[:, None]
    text_mask = torch.arange(5)[None] < torch.tensor([5, 2, 0, 1])[:, None]  # study 2 has no unit: left out
    project_visual, project_text = cha.visual_proj["sentence"], cha.text_proj["sentence"]

    batched = cha.transport_cost(project_visual(visual), visual_mask, project_text(text), text_mask)
    batched_grad = torch.autograd.grad(batched, project_visual.weight)[0]

    losses = []
    for i in range(4):
        n, m = int(visual_mask[i].sum()), int(text_mask[i].sum())
        if n == 0 or m == 0:
            continue
        x, y = project_visual(visual[i, :n]), project_text(text[i, :m])
        cost = torch.cdist(x, y) ** 2
        normalised = (cost / cost.max()).detach().numpy()
        plan = ot.unbalanced.sinkhorn_unbalanced(np.full(n, 1 / n), np.full(m, 1 / m), normalised, REG, REG_M)
        losses.append((cost * torch.from_numpy(plan)).sum() / (n * m))
    looped = torch.stack(losses).mean()
    looped_grad = torch.autograd.grad(looped, project_visual.weight)[0]

    torch.testing.assert_close(batched, looped, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(batched_grad, looped_grad, rtol=1e-6, atol=1e-9)


def test_squared_distances_match_cdist():
    x, y = torch.randn(3, 7, 16), torch.randn(3, 4, 16)
    torch.testing.assert_close(squared_distances(x, y), torch.cdist(x, y) ** 2, rtol=1e-4, atol=1e-4)


def test_collapse_is_measured_and_penalised():
    spread_out = torch.randn(200, 32)
    collapsed = torch.randn(1, 32).expand(200, -1) + 1e-6 * torch.randn(200, 32)
    assert unit_spread(spread_out) == pytest.approx(8.0, rel=0.1)  # sqrt(2 * 32) for unit-variance features
    assert unit_spread(collapsed) < 1e-4
    assert collapse_penalty(spread_out) < 0.1
    assert collapse_penalty(collapsed) > 0.95
    # why it is needed: the transport cost of two sides collapsed onto one point is zero, its minimum
    cha = HierarchicalAlignment(tiny_config(), text_dim=32)
    point = torch.randn(1, 1, 64)
    zero = cha.transport_cost(point.expand(2, 9, 64), torch.ones(2, 9, dtype=torch.bool),
                              point.expand(2, 3, 64), torch.ones(2, 3, dtype=torch.bool))
    assert zero < 1e-5


def test_the_forward_reports_a_collapsed_projection():
    model = make_model().eval()  # no dropout: the text side must not move between the two calls
    batch = make_batch([2, 1, 2], seed=6)
    healthy = model(batch)
    with torch.no_grad():
        model.cha.visual_proj["word"].weight.zero_()  # every visual word unit now lands on the bias vector
    collapsed = model(batch)
    assert healthy["spread_visual_word"] > 0.1 and collapsed["spread_visual_word"] < 1e-6
    assert collapsed["spread_text_word"] == pytest.approx(healthy["spread_text_word"].item())
    assert collapsed["cha_guard"] > healthy["cha_guard"]
