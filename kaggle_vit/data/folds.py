"""Stratified folds: a seeded fold number for every training row, saved as CSV and reused while
it matches the data (an unreadable file is made again from the seed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from ..errors import KaggleVitError
from ..io import atomic_path
from ..notices import notice


def make_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified, shuffled, seeded fold number (1..n_folds) for every row."""
    if n_folds < 2:
        raise KaggleVitError(f"--folds must be at least 2, got {n_folds}")
    counts = np.bincount(labels)
    if counts[counts > 0].min() < n_folds:
        raise KaggleVitError(f"the rarest class has {counts[counts > 0].min()} rows, fewer than {n_folds} folds")
    folds = np.full(len(labels), -1, dtype=np.int64)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, valid) in enumerate(skf.split(np.zeros(len(labels)), labels)):
        folds[valid] = k + 1
    return folds


def save_folds(path: Path, folds: np.ndarray, labels: np.ndarray) -> Path:
    """Save the fold assignment as CSV (row, label, fold) atomically."""
    frame = pd.DataFrame({"row": np.arange(len(folds)), "label": labels, "fold": folds})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _read_folds(path: Path) -> pd.DataFrame | None:
    """A saved fold assignment, or None when it cannot be read (it is remade from the seed)."""
    try:
        frame = pd.read_csv(path)
        frame["fold"].to_numpy(np.int64), frame["label"].to_numpy(np.int64)
        return frame
    except Exception as error:  # noqa: BLE001 - the file is derived from labels and seed: remake it
        notice(f"{path}: unreadable ({type(error).__name__}); making the folds again from the seed")
        return None


def split_folds(path: Path, labels: np.ndarray, n_folds: int, seed: int) -> tuple[np.ndarray, bool]:
    """The split saved at `path` when it matches the data, else a new one, and whether it is new
    (still to be saved): a caller can check what depends on the split before writing anything."""
    frame = _read_folds(path) if path.exists() else None
    if frame is not None:
        same = len(frame) == len(labels) and np.array_equal(frame["label"].to_numpy(), labels)
        if same and frame["fold"].max() == n_folds:
            return frame["fold"].to_numpy(np.int64), False
        raise KaggleVitError(f"{path}: saved folds do not match the data or --folds {n_folds}; delete it to re-split")
    return make_folds(labels, n_folds, seed), True


def load_or_make_folds(path: Path, labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Reuse saved folds when they match the data; otherwise make and save them."""
    folds, new = split_folds(path, labels, n_folds, seed)
    if new:
        save_folds(path, folds, labels)
    return folds
