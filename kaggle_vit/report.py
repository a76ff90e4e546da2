"""Plots a competitor looks at: training curves (more views arrive with `kaggle-vit report`)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(histories: dict[int, list[dict]], path: Path) -> Path:
    """Training and validation loss and accuracy per epoch, one line per fold."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, history in sorted(histories.items()):
        epochs = [r["epoch"] for r in history]
        line = ax_loss.plot(epochs, [r["train_loss"] for r in history], "--", alpha=0.6)[0]
        ax_loss.plot(epochs, [r["valid_loss"] for r in history], color=line.get_color(), label=f"fold {fold}")
        ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "--", color=line.get_color(), alpha=0.6)
        ax_acc.plot(epochs, [100 * r["valid_acc"] for r in history], color=line.get_color(), label=f"fold {fold}")
    ax_loss.set(title="loss (dashed: train, solid: validation)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy (dashed: train, solid: validation)", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
