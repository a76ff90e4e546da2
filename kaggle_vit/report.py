"""Plots a competitor looks at: curves, confusion matrix, prediction grids, attention rollout."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .errors import KaggleVitError  # noqa: E402
from .io import atomic_path  # noqa: E402
from .records import EpochRecord  # noqa: E402
from .run.rundir import RunDir  # noqa: E402
from .train.dataset import resolve_data_config  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(histories: dict[int, list[EpochRecord]], path: Path) -> Path:
    """Training loss and accuracy per epoch (dashed) and validation at the epochs that validated (points,
    joined), one colour per fold."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for fold, history in sorted(histories.items()):
        epochs = [r.epoch for r in history]
        validated = [r for r in history if r.validated]  # `valid_every` skips some
        line = ax_loss.plot(epochs, [r.train_loss for r in history], "--", alpha=0.6)[0]
        ax_loss.plot([r.epoch for r in validated], [r.valid_loss for r in validated], "o-", markersize=4,
                     color=line.get_color(), label=f"fold {fold}")
        ax_acc.plot(epochs, [100 * r.train_acc for r in history], "--", color=line.get_color(), alpha=0.6)
        ax_acc.plot([r.epoch for r in validated], [100 * r.valid_acc for r in validated], "o-", markersize=4,
                    color=line.get_color(), label=f"fold {fold}")
    ax_loss.set(title="loss (dashed: train; points: validation)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="accuracy (dashed: train; points: validation)", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(labels: np.ndarray, preds: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Confusion matrix of out-of-fold predictions (counts; the diagonal is correct)."""
    n = len(class_names)
    matrix = np.bincount(labels * n + preds, minlength=n * n).reshape(n, n)
    fig, ax = plt.subplots(figsize=(0.55 * n + 2.5, 0.55 * n + 2))
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    ax.imshow(off, cmap="Reds")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="black" if i != j else "tab:green", fontweight="bold" if i == j else "normal")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true",
           title=f"OOF confusion matrix: {100 * np.trace(matrix) / matrix.sum():.2f}% correct of {matrix.sum():,}")
    return _save(fig, path)


def _image(img: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 → something imshow draws: (H, W) for grey, (H, W, C) for colour."""
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def plot_grid(images: np.ndarray, titles: list[str], path: Path, suptitle: str, cols: int = 10,
              colors: list[str] | None = None) -> Path:
    """A grid of uint8 (N, C, H, W) images, each with its own title (labels, predictions)."""
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < len(images):
            ax.imshow(_image(images[i]), cmap="gray")
            ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): heads averaged, residual added, layers multiplied.
    Returns the class token's attention to each patch, (B, patches)."""
    rollout = None
    for attn in maps:
        a = attn.mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, 1:]


def plot_attention(model, images: np.ndarray, labels: list[str], path: Path) -> Path:
    """Each image beside its attention-rollout map over the patches (a kvit model's attention)."""
    model.eval()
    x = resolve_data_config(model).prepare(torch.from_numpy(images)).to(next(model.parameters()).device)
    rollout = attention_rollout(model.attention_maps(x)).float().cpu()
    gh, gw = model.grid_size
    heat = rollout.reshape(-1, 1, gh, gw)
    heat = torch.nn.functional.interpolate(heat, size=images.shape[-2:], mode="nearest")[:, 0].numpy()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(_image(images[i]), cmap="gray")
        axes[0, i].set_title(labels[i], fontsize=8)
        axes[1, i].imshow(_image(images[i]), cmap="gray")
        axes[1, i].imshow(heat[i], cmap="inferno", alpha=0.6)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle("attention rollout from the class token to the patches (bright: attended)", fontsize=10)
    return _save(fig, path)


def plot_run_curves(run_dir: Path) -> Path:
    """curves.png of a run: every finished fold's loss and accuracy per epoch."""
    run = RunDir(run_dir)
    return plot_curves(run.histories(run.finished_folds()), run.plot("curves"))


def make_report(run_dir: Path, data, n_images: int = 30, n_attention: int = 8) -> list[Path]:
    """Write every view of a run into its folder: curves, OOF confusion, test predictions (the fold
    ensemble, as the submission averages it), OOF mistakes, attention."""
    names, run = list(data.spec.class_names), RunDir(run_dir)
    folds = run.finished_folds()
    if not folds:
        raise KaggleVitError(f"{run_dir}: no finished folds yet; run kaggle-vit cv first")
    # every file read (and a damaged or old-format one refused) before any plot is written
    test_probs = np.mean([run.fold(k).read_test_probs() for k in folds], axis=0)
    model = run.fold(folds[0]).read_model(data.spec)
    written = [plot_run_curves(run_dir)]
    pred = test_probs.argmax(1)[:n_images]
    titles = [f"id {i}: {names[p]} ({100 * test_probs[j, p]:.0f}%)" for j, (i, p) in enumerate(zip(data.test.ids, pred))]
    written.append(plot_grid(data.test.images[:n_images], titles, run.plot("test_predictions"),
                             f"first {n_images} test images with the fold ensemble's predicted label", cols=6))
    if run.oof.exists():
        oof = pd.read_csv(run.oof)
        labels, preds = oof["label"].to_numpy(), oof["pred"].to_numpy()
        written.append(plot_confusion(labels, preds, names, run.plot("confusion")))
        wrong = np.flatnonzero(labels != preds)[:n_images]
        titles = [f"true {names[labels[r]]}, pred {names[preds[r]]}" for r in wrong]
        written.append(plot_grid(data.train.images[wrong], titles, run.plot("mistakes"),
                                 f"OOF mistakes: {len(np.flatnonzero(labels != preds))} of {len(labels):,} rows "
                                 f"(first {len(wrong)} shown)", cols=6, colors=["tab:red"] * len(wrong)))
    if hasattr(model, "attention_maps"):
        idx = np.arange(min(n_attention, len(data.train)))
        labels = [f"train row {r + 1}: {names[data.train.labels[r]]}" for r in idx]
        written.append(plot_attention(model, data.train.images[idx], labels, run.plot("attention")))
    return written
