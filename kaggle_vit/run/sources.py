"""Finished cv runs a run learns from, fold by fold:
- pseudo-labels (`--set pseudo=RUN`): the source run's confident test predictions become extra
  training rows, the standard Kaggle way to learn from the unlabelled test images;
- a teacher (`--set teacher=RUN`): the source run's models teach this run's by distillation.

Fold K learns only from the source run's fold K model, which never saw fold K's validation rows, so
the OOF score stays honest. That needs the same split, which `check_source` verifies before
anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import KaggleVitError
from .rundir import RunDir

if TYPE_CHECKING:
    from ..spec import CompetitionSpec


def check_source(source: Path, folds: np.ndarray, wanted: list[int], n_test: int, key: str = "pseudo",
                 spec: CompetitionSpec | None = None) -> None:
    """Refuse, in one line that names the setting (`key`), a source run that cannot teach or label
    the `wanted` folds of this run: missing, split differently, those folds unfinished, predicting
    another test set (pseudo), or with models of another image size or class count than `spec`'s (teacher)."""
    run = RunDir(source)
    if not run.folds.is_file():
        raise KaggleVitError(f"{key} {source}: not a cv run folder (no {run.folds.name})")
    try:
        theirs = pd.read_csv(run.folds)["fold"].to_numpy(np.int64)
    except (ValueError, KeyError, pd.errors.ParserError) as error:
        raise KaggleVitError(f"{key} {run.folds}: unreadable ({error})") from None
    if not np.array_equal(theirs, folds):
        raise KaggleVitError(f"{key} {source}: its folds differ from this run's (other folds, another seed or "
                             f"training set); fold K must learn from a model that never saw fold K")
    for k in wanted:
        fold = run.fold(k)
        needed = (fold.result, fold.test_probs) if key == "pseudo" else (fold.result, fold.model)
        if not all(path.is_file() for path in needed):
            raise KaggleVitError(f"{key} {source}: fold {k} is not finished (no {needed[0].name} or "
                                 f"{needed[1].name})")
        if key == "pseudo":
            _check_test_probs(fold.test_probs, source, n_test)
        elif spec is not None:
            fold.read_checkpoint(spec)


def _check_test_probs(path: Path, source: Path, n_test: int) -> None:
    """A source fold's test probabilities: readable, and one row per test row of this competition."""
    try:  # mapped, not read: only its shape is checked here; never a pickle
        probs = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise KaggleVitError(f"pseudo {path}: unreadable ({type(error).__name__}); rerun "
                             f"`kaggle-vit cv` for {source} to rewrite it") from None
    if not isinstance(probs, np.ndarray) or probs.ndim != 2 or probs.shape[0] != n_test:
        shape = getattr(probs, "shape", "no array")
        raise KaggleVitError(f"pseudo {path}: test probabilities of shape {shape}, this "
                             f"competition has {n_test} test rows")


def pseudo_labels(source: Path, fold: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The test rows whose top probability under the source run's fold `fold` model is at least
    `threshold`, and that class as their label."""
    probs = RunDir(source).fold(fold).read_test_probs()
    rows = np.flatnonzero(probs.max(axis=1) >= threshold)
    return rows, probs[rows].argmax(axis=1)

