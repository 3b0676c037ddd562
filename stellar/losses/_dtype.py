"""The working precision of the losses: fp32, or fp64 when the inputs already are."""
from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """x in float32, or float64 if it already is (fp16/bf16 are computed in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
