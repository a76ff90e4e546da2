"""What a run folder's files hold, one dataclass per file (`run.rundir.RunDir` reads and writes
them): an epoch of a fold (a row of history.csv), a finished fold (result.json), a fold being
trained (claim.json), the run (metrics.json) and a fold checkpoint's header (the JSON in
model.safetensors). No torch: `submit` and `report` read them before any model is built.

One name per quantity: a score without suffix is the plain validation (one view of each image, the
one the best epoch is chosen on); `_views` is with the run's test-time views (the predictor the
submission uses).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R")


def _from(cls: type[R], entries: dict[str, Any], **converted: Any) -> R:
    """`cls` from a file's entries (others ignored) and those `converted` from them; a missing one
    raises KeyError, which the readers report as an unreadable file."""
    return cls(**{f.name: converted[f.name] if f.name in converted else entries[f.name] for f in dataclasses.fields(cls)})


def _renamed_views(entries: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """A record written before the `_views` names (kaggle-vit up to 9032e2c spelled the quantity with
    views without suffix, and the plain one `NAME_plain`) in today's names; a newer one as it is."""
    if f"{names[0]}_plain" not in entries:
        return entries
    old = dict(entries)
    renamed = {f"{name}_views": old.pop(name) for name in names}
    renamed |= {name: old.pop(f"{name}_plain") for name in names}
    return old | renamed


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a fold (a row of history.csv): training loss and accuracy, and the plain
    validation (NaN for an epoch that `valid_every` leaves unvalidated)."""

    epoch: int
    train_loss: float
    train_acc: float
    valid_loss: float
    valid_acc: float
    valid_score: float  # the competition's metric
    lr: float
    seconds: float
    images: int  # the training images the epoch saw
    images_per_s: float

    @property
    def validated(self) -> bool:
        return not math.isnan(self.valid_acc)

    @classmethod
    def from_json(cls, entries: dict[str, Any]) -> EpochRecord:
        return _from(cls, entries, epoch=int(entries["epoch"]), images=int(entries["images"]))


@dataclass(frozen=True)
class FoldResult:
    """A finished fold (result.json, written last: it marks the fold finished). Validation is of
    the best epoch's model: plain, and with the run's `tta` test-time views."""

    fold: int
    best_epoch: int
    epochs: int
    metric: str  # the competition's metric, which valid_score is
    valid_loss: float
    valid_acc: float
    valid_score: float
    valid_acc_views: float
    valid_score_views: float
    tta: int
    train_seconds: float
    predict_seconds: float
    images_per_s: float  # the median epoch's training images/s
    amp: str
    device: str
    pseudo_rows: int  # the pseudo-labelled test rows it trained on (cv --pseudo)

    @classmethod
    def from_json(cls, entries: dict[str, Any]) -> FoldResult:
        return _from(cls, _renamed_views(entries, ("valid_acc", "valid_score")))


@dataclass(frozen=True)
class FoldClaim:
    """A fold being trained (claim.json, while it is): by which process of which machine, since
    when, and its last heartbeat (seconds since 1970, by that machine's clock)."""

    host: str
    pid: int
    started: float
    heartbeat: float

    @classmethod
    def from_json(cls, entries: dict[str, Any]) -> FoldClaim:
        return _from(cls, entries, host=str(entries["host"]), pid=int(entries["pid"]),
                     started=float(entries["started"]), heartbeat=float(entries["heartbeat"]))


@dataclass(frozen=True)
class SeedEnsemble:
    """The out-of-fold scores of a `cv --seeds` call's runs averaged, and those runs' folders."""

    runs: tuple[str, ...]
    oof_acc_views: float
    oof_score_views: float


@dataclass(frozen=True)
class RunMetrics:
    """A run (metrics.json, rewritten by each cv call): its finished folds and, once every fold is
    finished, its out-of-fold (OOF) scores, plain and with the test-time views."""

    competition: str
    model: str
    class_names: tuple[str, ...]
    metric: str
    n_folds: int
    folds: tuple[FoldResult, ...]  # the finished ones
    tta: int
    oof_acc: float | None
    oof_acc_views: float | None
    oof_score: float | None
    oof_score_views: float | None
    oof_loss_views: float | None
    train_seconds: float
    predict_seconds: float
    version: str
    git: str
    config: str  # the resolved config, as TOML
    seed_ensemble: SeedEnsemble | None = None

    @property
    def complete(self) -> bool:
        """Every fold finished: the OOF scores are there."""
        return self.oof_acc is not None

    @classmethod
    def from_json(cls, entries: dict[str, Any]) -> RunMetrics:
        entries = _renamed_views(entries, ("oof_acc", "oof_score"))
        if "oof_loss" in entries:  # before the `_views` names: the loss was (as now) with the views
            entries = {**entries, "oof_loss_views": entries["oof_loss"]}
        seeds = entries.get("seed_ensemble")
        if seeds is not None and "seed_runs" in entries:  # before the `_views` names: the runs beside it
            seeds = {"runs": entries["seed_runs"], "oof_acc_views": seeds["oof_acc"],
                     "oof_score_views": seeds["oof_score"]}
        return _from(cls, entries, class_names=tuple(entries["class_names"]),
                     folds=tuple(FoldResult.from_json(f) for f in entries["folds"]),
                     seed_ensemble=None if seeds is None else _from(SeedEnsemble, seeds, runs=tuple(seeds["runs"])))


@dataclass(frozen=True)
class CheckpointHeader:
    """What a fold checkpoint says about its weights (the JSON in its safetensors header): the
    model and keywords that take them, and the images, classes and fold they were trained on."""

    model: str
    kwargs: dict[str, Any]  # timm.create_model's keywords
    fold: int
    competition: str
    input_size: tuple[int, int, int]  # channels, height, width
    num_classes: int
    class_names: tuple[str, ...]
    valid_acc: float  # the best epoch's plain validation accuracy

    @classmethod
    def from_json(cls, entries: dict[str, Any]) -> CheckpointHeader:
        if not isinstance(entries.get("kwargs"), dict):
            raise ValueError("not a kaggle-vit fold checkpoint")
        # JSON has no tuples: the keywords (img_size) and the image size come back as they were saved
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in entries["kwargs"].items()}
        return _from(cls, entries, kwargs=kwargs, input_size=tuple(entries["input_size"]),
                     class_names=tuple(entries["class_names"]))


def to_json(record: Any) -> dict[str, Any]:
    """A record as its file holds it (tuples become JSON lists)."""
    return dataclasses.asdict(record)
