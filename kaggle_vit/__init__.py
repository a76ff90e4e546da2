"""kaggle-vit: Vision Transformers for Kaggle image-classification competitions.

Importing the package registers its ViT family with timm. The command line lives in
`kaggle_vit.cli` and is never imported here, so notebooks need no CLI library.
"""
from .competition import CompetitionSpec, list_competitions, load_spec
from .data import CompetitionData, ImageDataset, ImageTable, load_competition, make_folds
from .errors import KaggleVitError
from .fetch import ensure_data

__version__ = "0.1.0"

__all__ = [
    "CompetitionData", "CompetitionSpec", "ImageDataset", "ImageTable", "KaggleVitError",
    "ensure_data", "list_competitions", "load_competition", "load_spec", "make_folds",
]
