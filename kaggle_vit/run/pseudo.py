"""Pseudo-labels (`cv --set pseudo=RUN`): a finished cv run's confident test predictions become extra
training rows, the standard Kaggle way to learn from the unlabelled test images.

Fold K takes its labels from the source run's fold K model, which never saw fold K's validation
rows; those rows stay out of the training set and out of the labels, so the OOF score stays honest.
That needs the same split, which `check_source` verifies before anything is written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import KaggleVitError
from .rundir import RunDir


def check_source(source: Path, folds: np.ndarray, n_test: int) -> None:
    """Refuse, in one line, a source run that cannot label this run's folds: missing, split
    differently, unfinished, or predicting another test set."""
    run = RunDir(source)
    if not run.folds.is_file():
        raise KaggleVitError(f"pseudo {source}: not a cv run folder (no {run.folds.name})")
    try:
        theirs = pd.read_csv(run.folds)["fold"].to_numpy(np.int64)
    except (ValueError, KeyError, pd.errors.ParserError) as error:
        raise KaggleVitError(f"pseudo {run.folds}: unreadable ({error})") from None
    if not np.array_equal(theirs, folds):
        raise KaggleVitError(f"pseudo {source}: its folds differ from this run's (other folds, another seed or "
                             f"training set); fold K's labels must come from a model that never saw fold K")
    for k in range(1, int(folds.max()) + 1):
        fold = run.fold(k)
        if not fold.result.is_file() or not fold.test_probs.is_file():
            raise KaggleVitError(f"pseudo {source}: fold {k} is not finished (no {fold.result.name} or "
                                 f"{fold.test_probs.name})")
        try:  # mapped, not read: only its shape is checked here; never a pickle
            probs = np.load(fold.test_probs, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise KaggleVitError(f"pseudo {fold.test_probs}: unreadable ({type(error).__name__}); rerun "
                                 f"`kaggle-vit cv` for {source} to rewrite it") from None
        if not isinstance(probs, np.ndarray) or probs.ndim != 2 or probs.shape[0] != n_test:
            shape = getattr(probs, "shape", "no array")
            raise KaggleVitError(f"pseudo {fold.test_probs}: test probabilities of shape {shape}, this "
                                 f"competition has {n_test} test rows")


def pseudo_labels(source: Path, fold: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The test rows whose top probability under the source run's fold `fold` model is at least
    `threshold`, and that class as their label."""
    probs = RunDir(source).fold(fold).read_test_probs()
    rows = np.flatnonzero(probs.max(axis=1) >= threshold)
    return rows, probs[rows].argmax(axis=1)
