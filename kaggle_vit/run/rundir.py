"""The cv run folder: every file name in it is spelled here and nowhere else, with the readers
that decide whether a fold is usable, so `cv` (deciding what is finished) and `submit`/`report`
(using it) read a damaged file the same way (a fold checkpoint's format: `models.checkpoint`)."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..errors import KaggleVitError
from ..models.checkpoint import checkpoint_header

OLD_FORMAT = "in the old pickle format, which is never loaded (a pickle can run code)"
METRICS = "metrics.json"


@dataclass(frozen=True)
class FoldDir:
    """runs/.../foldK: one fold's checkpoint, training state, history, probabilities and summary."""

    root: Path

    @property
    def model(self) -> Path:
        """The best epoch's weights (safetensors) with the model's name and keywords (JSON)."""
        return self.root / "model.safetensors"

    @property
    def old_model(self) -> Path:
        """Where kaggle-vit before safetensors kept the weights, as a pickle: never read."""
        return self.root / "model.pt"

    @property
    def state(self) -> Path:
        """The last epoch's training state; exists only while the fold is unfinished."""
        return self.root / "state.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def valid_probs(self) -> Path:
        return self.root / "valid_probs.npz"

    @property
    def test_probs(self) -> Path:
        return self.root / "test_probs.npy"

    @property
    def result(self) -> Path:
        """The fold's summary, written last: it marks the fold finished."""
        return self.root / "result.json"


@dataclass(frozen=True)
class RunDir:
    """A run folder: resolved config, folds, per-fold files, OOF predictions, metrics and plots."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def folds(self) -> Path:
        return self.root / "folds.csv"

    @property
    def plan(self) -> Path:
        """The schedule the folds train to (`schedule.Plan`): kept, so a resumed run keeps it."""
        return self.root / "plan.json"

    @property
    def oof(self) -> Path:
        return self.root / "oof.csv"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    def plot(self, name: str) -> Path:
        """A view of the run: curves, confusion, test_predictions, mistakes, attention."""
        return self.root / f"{name}.png"

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.root / f"fold{k}")

    def n_folds(self) -> int:
        """The run's fold count (metrics.json); a folder that is no run, or a damaged file, is one line."""
        if not self.metrics.exists():
            raise KaggleVitError(f"{self.root}: not a kaggle-vit run (no {METRICS})")
        try:
            return int(json.loads(self.metrics.read_text(encoding="utf-8"))["n_folds"])
        except (ValueError, KeyError, TypeError) as error:
            raise KaggleVitError(f"{self.metrics}: unreadable ({type(error).__name__}); rerun `kaggle-vit cv` with the "
                                 f"same settings to rewrite it") from None

    def finished_folds(self, n_folds: int | None = None) -> list[int]:
        """The folds that wrote their summary, of the run's fold count."""
        n_folds = self.n_folds() if n_folds is None else n_folds
        return [k for k in range(1, n_folds + 1) if self.fold(k).result.exists()]

    def histories(self, folds: list[int]) -> dict[int, list[dict]]:
        """Every epoch's record of each fold (history.csv), for the curves."""
        return {k: pd.read_csv(self.fold(k).history).to_dict("records") for k in folds}

    def new_staging(self) -> Path:
        """A private folder for the fold workers' setup and any array no cache file holds (`.arrays-PID-*`,
        removed after)."""
        return Path(tempfile.mkdtemp(prefix=f".arrays-{os.getpid()}-", dir=self.root))

    def stagings(self) -> list[tuple[int, Path]]:
        """(pid, folder) of the staging folders present, left behind when a cv was killed."""
        found = [(p.name.split("-")[1], p) for p in self.root.glob(".arrays-*-*")]
        return [(int(pid), p) for pid, p in found if pid.isdigit()]


def shared_folds(run_dir: Path, competition: str, n_folds: int, seed: int, runs_root: Path | None = None) -> Path:
    """Where a run's fold assignment is kept: shared by every run of a competition with these folds
    and seed in its runs folder (runs/COMPETITION, or `runs_root`); for a run folder elsewhere
    (--run-dir), its own folds.csv, so two competitions' runs under one folder never share one."""
    root = runs_root or run_dir.parent
    if runs_root is None and root.name != competition:
        return RunDir(run_dir).folds
    return root / f"folds-k{n_folds}-seed{seed}.csv"


def runs_of(competition_runs: Path) -> list[Path]:
    """The run folders under runs/COMPETITION (those that wrote metrics)."""
    return [p.parent for p in competition_runs.glob(f"*/{METRICS}")]


def _load_arrays(path: Path) -> None:
    with open(path, "rb") as fh:
        loaded = np.load(fh, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            for key in loaded.files:
                loaded[key]  # reading each member checks its CRC


def read_test_probs(path: Path) -> np.ndarray:
    """A fold's saved test probabilities (an .npy array, never a pickle); a damaged file is one line
    naming it, never silently predicted again."""
    try:
        with open(path, "rb") as fh:
            probs = np.load(fh, allow_pickle=False)
        if not isinstance(probs, np.ndarray):
            raise ValueError("not an .npy array")
    except (OSError, ValueError, EOFError) as error:
        raise KaggleVitError(f"{path}: unreadable ({type(error).__name__}); rerun `kaggle-vit cv` with the same "
                             f"settings to rewrite it") from None
    return probs


READERS: dict[str, Callable[[Path], Any]] = {
    "result": lambda p: json.loads(p.read_text(encoding="utf-8")),
    "model": checkpoint_header,
    "valid_probs": _load_arrays,
    "test_probs": _load_arrays,
}


def _read(fold: FoldDir, what: str) -> tuple[Any, str | None]:
    """(contents, None), or (None, 'PATH is missing' / 'unreadable' / in the old format)."""
    path = getattr(fold, what)
    if not path.exists():
        if what == "model" and fold.old_model.exists():
            return None, f"{fold.old_model} is {OLD_FORMAT}"
        return None, f"{path} is missing"
    try:
        return READERS[what](path), None
    except Exception:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        return None, f"{path} is unreadable"


def read_checkpoint(run_dir: Path, fold: int, weights: bool = True) -> dict:
    """A fold's best-epoch checkpoint: its metadata, and its tensors (`state_dict`) when `weights`
    (without them, torch is not imported); a missing, damaged or old-format one is named with the
    way to retrain it."""
    files = RunDir(run_dir).fold(fold)
    ckpt, problem = _read(files, "model")
    if not problem and weights:
        from safetensors.torch import load_file  # lazy: torch for the weights only; saved probabilities need none

        try:
            ckpt = {**ckpt, "state_dict": load_file(files.model)}
        except Exception:  # noqa: BLE001 - whatever safetensors raises, the file is unusable
            problem = f"{files.model} is unreadable"
    if problem:
        raise KaggleVitError(f"fold {fold}'s checkpoint {problem}: rerun `kaggle-vit cv` with the same settings "
                             f"to retrain it")
    return ckpt


def fold_problem(run_dir: Path, fold: int) -> str | None:
    """Why a fold that wrote result.json cannot be used ('RUN/foldK/model.safetensors is unreadable'), or None."""
    files = RunDir(run_dir).fold(fold)
    return next((problem for what in READERS if (problem := _read(files, what)[1])), None)
