"""The cv run folder: every file name in it is spelled here and nowhere else, with the readers
that decide whether a fold is usable, so `cv` (deciding what is finished) and `submit`/`report`
(using it) read a damaged file the same way."""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .errors import KaggleVitError

if TYPE_CHECKING:
    import torch

CHECKPOINT_KEYS = {"model", "kwargs", "state_dict", "input_size", "num_classes"}
METRICS = "metrics.json"


@dataclass(frozen=True)
class FoldDir:
    """runs/.../foldK: one fold's checkpoint, training state, history, probabilities and summary."""

    root: Path

    @property
    def model(self) -> Path:
        """The best epoch's weights with the model's name and keywords."""
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
        import pandas as pd

        return {k: pd.read_csv(self.fold(k).history).to_dict("records") for k in folds}

    def new_staging(self) -> Path:
        """A private folder for the arrays handed to fold workers (`.arrays-PID-*`, removed after)."""
        return Path(tempfile.mkdtemp(prefix=f".arrays-{os.getpid()}-", dir=self.root))

    def stagings(self) -> list[tuple[int, Path]]:
        """(pid, folder) of the staging folders present, left behind when a cv was killed."""
        found = [(p.name.split("-")[1], p) for p in self.root.glob(".arrays-*-*")]
        return [(int(pid), p) for pid, p in found if pid.isdigit()]


def shared_folds(runs_root: Path, n_folds: int, seed: int) -> Path:
    """The fold assignment shared by every run of a competition with these folds and seed."""
    return runs_root / f"folds-k{n_folds}-seed{seed}.csv"


def runs_of(competition_runs: Path) -> list[Path]:
    """The run folders under runs/COMPETITION (those that wrote metrics)."""
    return [p.parent for p in competition_runs.glob(f"*/{METRICS}")]


def _checked(ckpt: Any) -> dict:
    if not (isinstance(ckpt, dict) and CHECKPOINT_KEYS <= set(ckpt)):
        raise ValueError("not a kaggle-vit fold checkpoint")
    return ckpt


class _WithoutTensors(pickle.Unpickler):
    """Reads a torch.save pickle without torch: every torch object (tensors, sizes) comes back as
    None, everything else (names, keywords, sizes, class names) as saved."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" or module.startswith("torch."):
            return lambda *args, **kwargs: None
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> None:
        return None  # a tensor's storage, kept in its own member of the archive


def checkpoint_header(path: Path) -> dict:
    """A fold checkpoint without its tensors, read without importing torch (seconds): what `submit`
    needs to check a fold against the competition. Every member's checksum is verified first, so a
    damaged file is refused here as loading it would refuse it."""
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"{damaged}: checksum mismatch")
        pickled = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pickled is None:
            raise ValueError("not a torch.save archive")
        return _checked(_WithoutTensors(io.BytesIO(archive.read(pickled))).load())


def _load_checkpoint(path: Path) -> dict:
    import torch

    return _checked(torch.load(path, map_location="cpu", weights_only=False))


def _load_arrays(path: Path) -> None:
    with open(path, "rb") as fh:
        loaded = np.load(fh, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            for key in loaded.files:
                loaded[key]  # reading each member checks its CRC


READERS: dict[str, Callable[[Path], Any]] = {
    "result": lambda p: json.loads(p.read_text(encoding="utf-8")),
    "model": checkpoint_header,
    "valid_probs": _load_arrays,
    "test_probs": _load_arrays,
}


def _read(fold: FoldDir, what: str) -> tuple[Any, str | None]:
    """(contents, None), or (None, 'missing' / 'unreadable')."""
    path = getattr(fold, what)
    if not path.exists():
        return None, "missing"
    try:
        return READERS[what](path), None
    except Exception:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        return None, "unreadable"


def read_checkpoint(run_dir: Path, fold: int, weights: bool = True) -> dict:
    """A fold's best-epoch checkpoint (without its tensors unless `weights`, and then without
    importing torch); a missing or damaged one is named with the way to retrain it."""
    files = RunDir(run_dir).fold(fold)
    ckpt, problem = _read(files, "model")
    if not problem and weights:
        try:
            ckpt = _load_checkpoint(files.model)
        except Exception:  # noqa: BLE001 - whatever torch raises, the file is unusable
            problem = "unreadable"
    if problem:
        raise KaggleVitError(f"fold {fold}'s checkpoint {files.model} is {problem}: rerun "
                             f"`kaggle-vit cv` with the same settings to retrain it")
    return ckpt


def model_from(ckpt: dict) -> "torch.nn.Module":
    """The model a fold checkpoint describes, with its best weights, in eval mode."""
    from .models import build

    model = build(ckpt["model"], ckpt["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def fold_problem(run_dir: Path, fold: int) -> str | None:
    """Why a fold that wrote result.json cannot be used ('RUN/foldK/model.pt is unreadable'), or None."""
    files = RunDir(run_dir).fold(fold)
    for what in READERS:
        problem = _read(files, what)[1]
        if problem:
            return f"{getattr(files, what)} is {problem}"
    return None
