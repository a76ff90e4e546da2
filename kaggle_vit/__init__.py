"""kaggle-vit: Vision Transformers for Kaggle image-classification competitions.

The Python API below is what the CLI calls. Names are imported on first use (PEP 562), so
`kaggle-vit --help` and `kaggle-vit data` start without torch, timm or albumentations; using a
model (`create_model`, `run_cv`, ...) registers the `kvit_*` family with timm. The CLI itself
(`kaggle_vit.cli`, Typer) is never imported here, so a notebook needs no CLI library.
"""
from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# albumentations checks online for a newer release on import and, offline (Kaggle with internet
# off, CI), prints a warning in every process that imports it. Spawned fold workers inherit this.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_EXPORTS = {
    "config": ("PRESETS", "TrainConfig", "save_config"),
    "data.fetch": ("ensure_data",),
    "data.folds": ("make_folds",),
    "data.layouts": ("CompetitionData", "load_competition"),
    "data.tables": ("ImageTable",),
    "errors": ("KaggleVitError",),
    "models.factory": ("create_model",),
    "models.pretrained": ("find_weights",),
    "models.vit": ("KaggleViT",),
    "report": ("make_report", "plot_curves"),
    "run.cv": ("CVResult", "default_run_dir", "run_cv"),
    "run.settings": ("resolve_config",),
    "spec": ("CompetitionSpec", "list_competitions", "load_spec"),
    "submit": ("Submission", "latest_run", "make_submission", "score_submission"),
    "train.dataset": ("ImageDataset",),
    "train.engine": ("FitResult", "fit"),
    "versions": ("check_versions",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Import the module that defines `name` when it is first used."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'kaggle_vit' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
