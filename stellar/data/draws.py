"""Every random draw of a sample, a pure function of (seed, epoch, position).

A sample is named by its position p in the epoch's order (`stellar.data.order`); its generator
is seeded by `stream_seed(seed, epoch, p)` and gives, in this order:
- the uniforms of its 1 + G + Lc crop rows (`augment.NUM_UNIFORMS` each): windows, flips and
  colours, turned into rows once the decoded image's size is known (`crop_rows`);
- the patches each of its G masked global views keeps,
  `stellar.model.masking.sample_keep_indices(G, grid, grid, ...)`: LongTensor[G, n_keep].
So a sample gets the same crops, colours and masks on any backend, any world size and after a
resume, and a substitute for a bad file keeps the draws of the position it fills.

Batch layout of the rows (`crops [K, 12]`, K = B * (1 + G + Lc), column 0 = the image's index in
the batch): the B `image` rows, then the B * G global rows (row B + i * G + v is view v of
image i), then the B * Lc local rows (B + B * G + i * Lc + v).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from stellar.data import augment
from stellar.data.order import stream_seed
from stellar.data.spec import ViewSpec

__all__ = ["SampleDraws", "draw_samples", "crop_rows"]


@dataclass
class SampleDraws:
    """The draws of B samples: uniforms Tensor[B, 1 + G + Lc, NUM_UNIFORMS] float64, keep
    LongTensor[B, G, n_keep] (sorted patch indices)."""

    uniforms: torch.Tensor
    keep: torch.Tensor


def draw_samples(spec: ViewSpec, seed: int, epoch: int, positions: Sequence[int]) -> SampleDraws:
    """The draws of the samples at `positions` of `epoch` (module docstring)."""
    from stellar.model.masking import sample_keep_indices

    V, G = spec.views_per_sample, spec.num_global
    B = len(positions)
    uniforms = torch.empty(B, V, augment.NUM_UNIFORMS, dtype=torch.float64)
    keep = torch.empty(B, G, spec.n_keep, dtype=torch.long)
    for i, p in enumerate(positions):
        g = torch.Generator().manual_seed(stream_seed(seed, epoch, int(p)))
        uniforms[i] = torch.rand(V, augment.NUM_UNIFORMS, generator=g, dtype=torch.float64)
        keep[i] = sample_keep_indices(G, spec.grid, spec.grid, spec.mask_ratio, spec.focal, spec.focal_prob,
                                      generator=g)
    return SampleDraws(uniforms, keep)


def crop_rows(spec: ViewSpec, draws: SampleDraws, sizes: Sequence[Sequence[int]]) -> torch.Tensor:
    """The batch's crop rows, Tensor[K, 12] float32 on the CPU (layout in the module docstring).

    sizes: the decoded images' (H, W), in batch order.
    """
    rows = augment.multicrop_rows(draws.uniforms, sizes, spec.num_global, spec.num_local, spec.global_scale,
                                  spec.local_scale, spec.ratio, **spec.color_kwargs)
    return torch.cat([rows["image"], rows["global"], rows["local"]])
