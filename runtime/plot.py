"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bstc.runtime.errors import UsageError  # noqa: E402
from bstc.runtime.metrics import read_metrics  # noqa: E402
from bstc.runtime.rundir import RunFiles  # noqa: E402


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(y) < n:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:n] / np.arange(1, n)
    return np.concatenate([head, (c[n:] - c[:-n]) / n])


def plot_losses(run_dir: Path, out: Path | None = None) -> Path:
    """Train loss (raw and smoothed) and validation loss against step -> RUN_DIR/loss.png."""
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("split", "train") == "train" and "loss" in r]
    val = [r for r in recs if r.get("split") == "validation" and "loss" in r]
    if not train and not val:
        raise UsageError(f"no metrics in {run_dir / 'metrics.jsonl'}: nothing to plot")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        s = np.array([r["step"] for r in train])
        y = np.array([r["loss"] for r in train], dtype=float)
        ax.plot(s, y, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(s, _smooth(y, max(1, len(y) // 50)), color="tab:blue", lw=1.8, label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", color="tab:orange",
                lw=1.8, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    sec = ax.secondary_yaxis("right", functions=(lambda x: x / np.log(2), lambda b: b * np.log(2)))
    sec.set_ylabel("bits / byte")
    fig.tight_layout()
    out = Path(out) if out else RunFiles(run_dir).loss_plot
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_per_position(curves: dict[int, Any], out: Path, title: str = "", window: int | None = None) -> Path:
    """Loss against position in the sequence, one line per evaluated length."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for length, c in sorted(curves.items()):
        ax.plot(np.asarray(c["positions"]), np.asarray(c["loss"]), lw=1.4, label=f"L = {length}")
    if window:
        ax.axvline(window, color="gray", ls=":", lw=1, label=f"window = {window}")
    ax.set_xscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "per-position loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
