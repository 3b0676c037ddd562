"""The training curves of a run: every column of ``metrics.csv`` against the step, as one PNG.

    plot_metrics("runs/demo", "runs/demo/curves.png")

One panel per column: the total loss, each named loss, the learning rate and images/s (whatever
the run logged, in the file's order). Losses are drawn raw (thin) and smoothed (an exponential
moving average, ``smooth``); a loss that stays positive gets a log y axis.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path


def read_columns(path: str | os.PathLike) -> tuple[list[int], dict[str, list[float]]]:
    """``metrics.csv`` -> (steps, {column: values}); empty cells become NaN."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path} holds no rows with a step column")
    steps = [int(r["step"]) for r in rows]
    cols = {k: [float(r[k]) if r.get(k) not in (None, "") else math.nan for r in rows] for k in rows[0] if k != "step"}
    return steps, cols


def ema(values: list[float], smooth: float) -> list[float]:
    out, acc = [], None
    for v in values:
        if math.isfinite(v):
            acc = v if acc is None else smooth * acc + (1 - smooth) * v
        out.append(acc if acc is not None else math.nan)
    return out


def plot_metrics(run: str | os.PathLike, out: str | os.PathLike | None = None, smooth: float = 0.9) -> Path:
    """Draw ``RUN/metrics.csv`` (or a metrics file given directly) to ``out`` (default RUN/curves.png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("stellar plot needs matplotlib: pip install 'stellar[eval]'") from exc
    run = Path(run)
    csv_path = run if run.is_file() else run / "metrics.csv"
    steps, cols = read_columns(csv_path)
    out = Path(out) if out is not None else csv_path.parent / "curves.png"
    n = len(cols)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, cols.items()):
        is_loss = name not in ("lr", "img_per_s")
        ax.plot(steps, values, lw=0.8, alpha=0.45 if is_loss else 1.0, color="C0")
        if is_loss and len(values) > 1:
            ax.plot(steps, ema(values, smooth), lw=1.5, color="C1")
        finite = [v for v in values if math.isfinite(v)]
        if is_loss and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_title({"img_per_s": "images/s", "lr": "learning rate"}.get(name, name), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(str(csv_path), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
