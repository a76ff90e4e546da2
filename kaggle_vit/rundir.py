"""A cv run folder's fold files, read the same way by `cv` (to decide what is finished) and by
`submit`/`report` (to use them), so a damaged file gets the same one-line diagnosis everywhere."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import KaggleVitError

CHECKPOINT_KEYS = {"model", "kwargs", "state_dict", "input_size", "num_classes"}


def fold_dir(run_dir: Path, fold: int) -> Path:
    """runs/.../foldK: one fold's checkpoint, history, probabilities and summary."""
    return run_dir / f"fold{fold}"


def _load_checkpoint(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not (isinstance(ckpt, dict) and CHECKPOINT_KEYS <= set(ckpt)):
        raise ValueError("not a kaggle-vit fold checkpoint")
    return ckpt


def _load_arrays(path: Path) -> None:
    with open(path, "rb") as fh:
        loaded = np.load(fh, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            for key in loaded.files:
                loaded[key]  # reading each member checks its CRC


FOLD_FILES: dict[str, Callable[[Path], Any]] = {
    "result.json": lambda p: json.loads(p.read_text(encoding="utf-8")),
    "model.pt": _load_checkpoint,
    "valid_probs.npz": _load_arrays,
    "test_probs.npy": _load_arrays,
}


def _read(path: Path) -> tuple[Any, str | None]:
    """(contents, None), or (None, 'missing' / 'unreadable')."""
    if not path.exists():
        return None, "missing"
    try:
        return FOLD_FILES[path.name](path), None
    except Exception:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        return None, "unreadable"


def read_checkpoint(run_dir: Path, fold: int) -> dict:
    """A fold's best-epoch checkpoint; a missing or damaged one is named with the way to retrain it."""
    path = fold_dir(run_dir, fold) / "model.pt"
    ckpt, problem = _read(path)
    if problem:
        raise KaggleVitError(f"fold {fold}'s checkpoint {path} is {problem}: rerun `kaggle-vit cv` with the same "
                             f"settings to retrain it")
    return ckpt


def fold_problem(run_dir: Path, fold: int) -> str | None:
    """Why a fold that wrote result.json cannot be used ('RUN/foldK/model.pt is unreadable'), or None."""
    for name in FOLD_FILES:
        path = fold_dir(run_dir, fold) / name
        problem = _read(path)[1]
        if problem:
            return f"{path} is {problem}"
    return None
