"""Blends of several runs fitted on their out-of-fold probabilities (`submit --weighting fit`):
greedy hill climbing with replacement (Caruana et al., 2004) or a stacked logistic regression,
each scored in-sample and by a nested check that never fits on the rows it scores. No torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .metrics import EPS, Metric

# A fitted blend: each member's weight, and the blend of members' probabilities (members, rows, classes).
Blend = tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class BlendFit:
    """A blend fitted on the members' OOF probabilities: each member's OOF score, the blend's
    (in-sample: fitted and scored on the same rows), its nested score (each fold's rows scored by
    a blend fitted on the other folds' rows, pooled) and the members' weights (hill: their share
    of the climb's picks; stack: their share of the regression's absolute coefficients on
    standardised log-probabilities, a reading of their importance, not a mixture)."""

    method: str
    metric: str
    rows: int
    member_scores: tuple[float, ...]
    score: float
    nested_score: float
    weights: tuple[float, ...]


def _best(scores: list[float], metric: Metric) -> int:
    """The index of the best score by the metric's direction (the first of equal ones)."""
    best = 0
    for i, score in enumerate(scores):
        if metric.better(score, scores[best]):
            best = i
    return best


def hill_climb(members: np.ndarray, labels: np.ndarray, metric: Metric, max_steps: int = 100) -> np.ndarray:
    """Caruana's forward selection with replacement: start from the best member, add the member
    whose addition most improves the metric while one does (at most `max_steps`); weights are the
    members' counts over the total."""
    scores = [metric(labels, m) for m in members]
    counts = np.zeros(len(members))
    first = _best(scores, metric)
    counts[first], total, current = 1, members[first].astype(np.float64), scores[first]
    for _ in range(max_steps):
        tries = [metric(labels, (total + m) / (counts.sum() + 1)) for m in members]
        pick = _best(tries, metric)
        if not metric.better(tries[pick], current):
            break
        counts[pick] += 1
        total, current = total + members[pick], tries[pick]
    return counts / counts.sum()


def _hill(members: np.ndarray, labels: np.ndarray, metric: Metric) -> Blend:
    weights = hill_climb(members, labels, metric)
    return weights, lambda probs: np.tensordot(weights, probs, axes=1)


def _log_features(members: np.ndarray) -> np.ndarray:
    """(members, rows, classes) probabilities → (rows, members × classes) log-probabilities."""
    logs = np.log(np.clip(members, EPS, 1.0))
    return logs.transpose(1, 0, 2).reshape(members.shape[1], -1)


def _stack(members: np.ndarray, labels: np.ndarray, metric: Metric) -> Blend:
    # lazy: slow to import; only a stacked blend needs them
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_members, _, n_classes = members.shape
    # standardised features: the coefficients then compare the members on one scale
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(_log_features(members), labels)
    share = np.abs(model[-1].coef_).reshape(-1, n_members, n_classes).sum(axis=(0, 2))

    def blend(probs: np.ndarray) -> np.ndarray:
        out = np.zeros(probs.shape[1:])
        out[:, model.classes_] = model.predict_proba(_log_features(probs))  # a class no row held stays 0
        return out

    return share / share.sum(), blend


FITTERS: dict[str, Callable[[np.ndarray, np.ndarray, Metric], Blend]] = {"hill": _hill, "stack": _stack}


def fit_blend(members: np.ndarray, labels: np.ndarray, fold_of_row: np.ndarray, metric: Metric,
              method: str = "hill") -> tuple[BlendFit, Callable[[np.ndarray], np.ndarray]]:
    """Fit a blend of `members` ((members, rows, classes) OOF probabilities) on the rows' `labels`,
    and check it honestly: each fold's rows are predicted by a blend fitted without them. Returns
    the fit's record and the blend to apply to the members' test probabilities."""
    fitter = FITTERS[method]
    weights, blend = fitter(members, labels, metric)
    nested = np.zeros(members.shape[1:])
    for k in np.unique(fold_of_row):
        held = fold_of_row == k
        _, blend_without = fitter(members[:, ~held], labels[~held], metric)
        nested[held] = blend_without(members[:, held])
    fit = BlendFit(method, metric.name, len(labels), tuple(metric(labels, m) for m in members),
                   metric(labels, blend(members)), metric(labels, nested), tuple(float(w) for w in weights))
    return fit, blend
