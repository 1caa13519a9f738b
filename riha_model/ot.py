"""Entropic unbalanced optimal transport for a batch of padded problems, in torch.

POT's `ot.unbalanced.sinkhorn_unbalanced` solves one problem per call, and POT's batched solvers (`ot.batch`) cover
balanced transport only. The alignment loss solves one small problem per study and level at every training step, so
this module runs POT's generalised Sinkhorn-Knopp iteration (Chizat et al. 2016; KL regularisation towards a b^T,
POT's default since 0.9.5) on a whole batch at once, with masks for the padded rows and columns. Each problem stops
on POT's own criterion at its own iteration, so every plan equals what POT returns for that problem alone
(tests/model/test_model_ot.py checks this).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def uniform_marginals(mask: Tensor) -> Tensor:
    """1/n on the n real entries of each row of a [B, N] mask, 0 on padding."""
    mask = mask.to(torch.float64)
    return mask / mask.sum(-1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def sinkhorn_unbalanced_batch(a: Tensor, b: Tensor, cost: Tensor, reg: float, reg_m: float,
                              max_iter: int = 1000, tol: float = 1e-6) -> Tensor:
    """Plans [B, N, M] of min <P, C> + reg KL(P | a b^T) + reg_m KL(P 1 | a) + reg_m KL(P^T 1 | b), per problem.

    a [B, N] and b [B, M] are the masses; a zero entry marks padding (its row or column of the plan is zero), and a
    problem with no mass on one side gets a zero plan.
    Computed in the dtype of `cost` (float64 recommended: the problems are small and POT works in float64).
    """
    a, b = a.to(cost.dtype), b.to(cost.dtype)
    row_real, col_real = a > 0, b > 0
    nonempty = row_real.any(-1, keepdim=True) & col_real.any(-1, keepdim=True)  # an empty side: a zero plan
    row_real, col_real = row_real & nonempty, col_real & nonempty
    kernel = torch.exp(-cost / reg) * a[:, :, None] * b[:, None, :]
    exponent = 1.0 if math.isinf(reg_m) else reg_m / (reg_m + reg)  # reg_m = inf: balanced transport
    u, v = (torch.ones_like(a), torch.ones_like(b))
    active = torch.ones(cost.shape[0], dtype=torch.bool, device=cost.device)

    def scale(mass: Tensor, kernel_sum: Tensor, real: Tensor) -> Tensor:
        return torch.where(real, (mass / torch.where(real, kernel_sum, 1.0)) ** exponent, 0.0)

    for _ in range(max_iter):
        new_u = scale(a, torch.bmm(kernel, v[:, :, None])[..., 0], row_real)
        new_v = scale(b, torch.bmm(kernel.transpose(1, 2), new_u[:, :, None])[..., 0], col_real)
        new_u = torch.where(active[:, None], new_u, u)
        new_v = torch.where(active[:, None], new_v, v)
        error = 0.5 * (_relative_change(new_u, u) + _relative_change(new_v, v))
        u, v = new_u, new_v
        active = active & (error >= tol)
        if not active.any():
            break
    return u[:, :, None] * kernel * v[:, None, :]


def _relative_change(new: Tensor, old: Tensor) -> Tensor:
    """POT's stopping measure: max |new - old| / max(max |new|, max |old|, 1), per problem."""
    scale = torch.maximum(new.abs().amax(-1), old.abs().amax(-1)).clamp_min(1.0)
    return (new - old).abs().amax(-1) / scale
