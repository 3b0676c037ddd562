"""Entropic optimal-transport matching of a view's sparse tokens to the full image's.

STELLAR.md section 5: cost = Euclidean distance (r x r), epsilon 0.1, 5 log-domain Sinkhorn
iterations on the duals with uniform marginals, transport plan P, hard match = argmax over
targets per predicted token. Runs in fp32 with autocast off, without gradient.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from stellar.losses._dtype import upcast

__all__ = ["transport_plan", "match_tokens"]


def _check(pred: Tensor, target: Tensor) -> None:
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating Tensor[B, r, D], got {got}")
    if pred.shape[0] != target.shape[0] or pred.shape[2] != target.shape[2]:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must share B and D")
    if pred.shape[1] == 0 or target.shape[1] == 0:
        raise ValueError("pred and target must hold at least one token each")


@torch.no_grad()
def transport_plan(pred: Tensor, target: Tensor, epsilon: float = 0.1,
                   iterations: int = 5) -> Tensor:
    """Entropic OT plan between predicted and target tokens, per image.

    pred: Tensor[B, r, D], target: Tensor[B, r', D]. Returns P: Tensor[B, r, r'] (float32;
    float64 for float64 inputs) with ``P[b, i, j] = exp((f_i + g_j - C_ij) / epsilon)``, C the
    Euclidean distances and (f, g) the duals after ``iterations`` log-domain Sinkhorn updates
    (f first, then g, both from zero) towards the uniform marginals 1/r and 1/r'. After the
    last g update the columns sum exactly to 1/r'; the rows approximately to 1/r.
    """
    _check(pred, target)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        C = torch.cdist(upcast(pred), upcast(target),               # B x r x r'
                        compute_mode="donot_use_mm_for_euclid_dist")   # exact, r is small
        B, r, rt = C.shape
        log_a = -math.log(r)                                           # uniform row marginal
        log_b = -math.log(rt)                                          # uniform column marginal
        f = C.new_zeros(B, r, 1)                                       # B x r x 1
        g = C.new_zeros(B, 1, rt)                                      # B x 1 x r'
        for _ in range(iterations):
            f = epsilon * log_a - epsilon * torch.logsumexp((g - C) / epsilon, dim=2, keepdim=True)
            g = epsilon * log_b - epsilon * torch.logsumexp((f - C) / epsilon, dim=1, keepdim=True)
        return torch.exp((f + g - C) / epsilon)                        # B x r x r'


@torch.no_grad()
def match_tokens(pred: Tensor, target: Tensor, epsilon: float = 0.1, iterations: int = 5,
                 return_plan: bool = False):
    """For each predicted token i, the index of its target token (argmax of the plan's row).

    pred: Tensor[B, r, D] (a view's sparse tokens), target: Tensor[B, r, D] (the full image's,
    treated as detached). Returns LongTensor[B, r]; with ``return_plan=True`` returns
    ``(match, P)`` with P: Tensor[B, r, r] from :func:`transport_plan`. The hard match is
    per row, so two predicted tokens may pick the same target.
    """
    P = transport_plan(pred, target, epsilon, iterations)
    match = P.argmax(dim=2)                                            # B x r
    return (match, P) if return_plan else match
