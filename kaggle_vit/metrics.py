"""The metrics Kaggle scores image competitions with, computed by scikit-learn from class indices
and probabilities, each with its direction: accuracy, log loss, ROC AUC (binary), micro and macro F1."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import KaggleVitError

# Kaggle's log loss clips every probability into [EPS, 1 - EPS] (and renormalises each row).
EPS = 1e-15


def clip_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities clipped as Kaggle's log loss clips them, rows renormalised to sum to 1."""
    clipped = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return clipped / clipped.sum(axis=1, keepdims=True)


def _accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score  # lazy: specs import this module, and --help and data need no sklearn

    return float(accuracy_score(labels, probs.argmax(1)))


def _logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import log_loss  # lazy: specs import this module, and --help and data need no sklearn

    return float(log_loss(labels, clip_probs(probs), labels=np.arange(probs.shape[1])))


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # lazy: specs import this module, and --help and data need no sklearn

    if len(np.unique(labels)) < 2:
        raise KaggleVitError("ROC AUC needs rows of both classes; these rows hold one")
    return float(roc_auc_score(labels, probs[:, 1]))


def _f1(average: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def score(labels: np.ndarray, probs: np.ndarray) -> float:
        from sklearn.metrics import f1_score  # lazy: specs import this module, and --help and data need no sklearn

        return float(f1_score(labels, probs.argmax(1), average=average, labels=np.arange(probs.shape[1])))

    return score


@dataclass(frozen=True)
class Metric:
    """A competition metric: its name, whether higher is better, and its scorer of (class indices,
    (N, classes) probabilities); a metric of labels scores the most probable class."""

    name: str
    higher_is_better: bool
    scorer: Callable[[np.ndarray, np.ndarray], float]
    binary_only: bool = False

    def __call__(self, labels: np.ndarray, probs: np.ndarray) -> float:
        return self.scorer(np.asarray(labels), np.asarray(probs))

    def better(self, score: float, than: float | None) -> bool:
        """Whether `score` beats `than` (None: nothing yet)."""
        return than is None or (score > than if self.higher_is_better else score < than)

    @property
    def direction(self) -> str:
        """Optuna's word for the direction."""
        return "maximize" if self.higher_is_better else "minimize"


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", True, _accuracy),
    "logloss": Metric("logloss", False, _logloss),
    "auc": Metric("auc", True, _auc, binary_only=True),
    "f1_micro": Metric("f1_micro", True, _f1("micro")),
    "f1_macro": Metric("f1_macro", True, _f1("macro")),
}


def get_metric(name: str) -> Metric:
    """The metric called `name` (a spec's `metric`)."""
    if name not in METRICS:
        raise KaggleVitError(f"metric '{name}' is not known (known: {', '.join(METRICS)})")
    return METRICS[name]


def one_hot(indices: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices as probabilities (1 for the class, 0 elsewhere): how a label submission is scored
    by a metric of probabilities."""
    out = np.zeros((len(indices), n_classes), dtype=np.float64)
    out[np.arange(len(indices)), indices] = 1.0
    return out
