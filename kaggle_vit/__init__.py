"""kaggle-vit: Vision Transformers for Kaggle image-classification competitions.

Importing the package registers its ViT family (`kvit_*`) with timm. The Python API below is
what the CLI calls; the CLI itself (`kaggle_vit.cli`, Typer) is never imported here, so a
notebook needs no CLI library.
"""
__version__ = "0.1.0"

from .competition import CompetitionSpec, list_competitions, load_spec
from .config import PRESETS, TrainConfig, resolve_config, save_config
from .cv import CVResult, default_run_dir, run_cv
from .data import CompetitionData, ImageDataset, ImageTable, load_competition, make_folds
from .engine import FitResult, fit
from .errors import KaggleVitError
from .fetch import ensure_data
from .models import KaggleViT, create_model
from .report import make_report, plot_curves
from .submit import Submission, latest_run, make_submission, score_submission

__all__ = [
    "CVResult", "CompetitionData", "CompetitionSpec", "FitResult", "ImageDataset", "ImageTable", "KaggleViT",
    "KaggleVitError", "PRESETS", "Submission", "TrainConfig", "create_model", "default_run_dir", "ensure_data",
    "fit", "latest_run", "list_competitions", "load_competition", "load_spec", "make_folds", "make_report",
    "make_submission", "plot_curves", "resolve_config", "run_cv", "save_config", "score_submission",
]
