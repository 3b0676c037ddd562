"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (STELLAR.md section 6)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """``lr(step)`` for the optimizer step ``step`` in ``[0, total_steps)``.

    Warm-up: ``warmup_steps = int(warmup * total_steps)`` steps rising linearly,
    ``lr = base_lr * (step + 1) / warmup_steps`` (never 0, reaching ``base_lr`` on the last).
    Then cosine from ``base_lr`` towards ``min_lr`` over the remaining steps:
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)``,
    ``lr = min_lr + (base_lr - min_lr) * (1 + cos(pi t)) / 2``. Past the end it stays at ``min_lr``.
    """

    base_lr: float
    total_steps: int
    warmup: float = 0.1
    min_lr: float = 1e-6

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.base_lr < self.min_lr:
            raise ValueError(f"base_lr ({self.base_lr}) must be >= min_lr ({self.min_lr})")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.total_steps)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        warm = self.warmup_steps
        if step < warm:
            return self.base_lr * (step + 1) / warm
        if step >= self.total_steps:
            return self.min_lr
        t = (step - warm) / (self.total_steps - warm)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return asdict(self)
