"""Read, validate and cache Kaggle image CSVs; the torch Dataset; stratified folds.

Rows are numbered from 1 for the first data row (the header is row 0), as a spreadsheet
shows them after its header line; errors name file, row and column.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .competition import CompetitionSpec
from .errors import KaggleVitError
from .io import atomic_path

CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageTable:
    """Images as uint8 (N, C, H, W), integer labels (None for test) and submission ids."""

    images: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _first_cell(mask: np.ndarray) -> tuple[int, int]:
    """Row and column index of the first True cell in file order."""
    flat = int(np.argmax(mask.ravel()))
    return divmod(flat, mask.shape[1])


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, low_memory=False, skipinitialspace=False)
    except FileNotFoundError:
        raise KaggleVitError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise KaggleVitError(f"{path}: file is empty") from None
    except pd.errors.ParserError as err:
        raise KaggleVitError(f"{path}: {str(err).strip().splitlines()[-1]}") from None


def _check_header(path: Path, columns: list[str], spec: CompetitionSpec, train: bool) -> None:
    pixels = spec.pixel_columns
    expected = ([spec.label_column] if train else []) + pixels
    if not train and spec.label_column in columns:
        raise KaggleVitError(f"{path}: row 0, column '{spec.label_column}': the test file must not have a label column")
    if train and spec.label_column not in columns:
        raise KaggleVitError(f"{path}: row 0: missing label column '{spec.label_column}'")
    extra = [c for c in columns if c not in expected and c != spec.id_column]
    missing = [c for c in pixels if c not in columns]
    n_pix = len(columns) - len([c for c in columns if c in (spec.label_column, spec.id_column)])
    if missing or extra:
        what = f"missing column '{missing[0]}'" if missing else f"unexpected column '{extra[0]}'"
        raise KaggleVitError(
            f"{path}: row 0: {what}: expected {len(pixels)} pixel columns "
            f"({pixels[0]}..{pixels[-1]} for {spec.height}x{spec.width}x{spec.channels}), found {n_pix}"
        )


def _numeric(path: Path, frame: pd.DataFrame) -> np.ndarray:
    """All cells as float64, naming the first text or empty cell."""
    text_cols = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if text_cols:
        bad_row, bad_col = None, None
        for c in text_cols:
            nums = pd.to_numeric(frame[c], errors="coerce")
            bad = nums.isna() & frame[c].notna()
            if bad.any():
                r = int(np.argmax(bad.to_numpy()))
                if bad_row is None or r < bad_row:
                    bad_row, bad_col = r, c
        if bad_row is not None:
            value = frame[bad_col].iloc[bad_row]
            raise KaggleVitError(f"{path}: row {bad_row + 1}, column '{bad_col}': '{value}' is not a number")
        frame = frame.apply(pd.to_numeric)
    values = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(values).any():
        r, c = _first_cell(np.isnan(values))
        raise KaggleVitError(f"{path}: row {r + 1}, column '{frame.columns[c]}': empty cell")
    return values


def _check_values(path: Path, values: np.ndarray, columns: list[str], lo: int, hi: int, what: str) -> None:
    bad = values != np.floor(values)
    if bad.any():
        r, c = _first_cell(bad)
        raise KaggleVitError(f"{path}: row {r + 1}, column '{columns[c]}': {values[r, c]:g} is not an integer")
    bad = (values < lo) | (values > hi)
    if bad.any():
        r, c = _first_cell(bad)
        raise KaggleVitError(f"{path}: row {r + 1}, column '{columns[c]}': {what} {values[r, c]:g} is outside {lo}..{hi}")


def parse_image_csv(path: Path, spec: CompetitionSpec, train: bool) -> ImageTable:
    """Parse and validate one train/test CSV into an ImageTable; raise KaggleVitError on bad input."""
    frame = _read_csv(path)
    if len(frame) == 0:
        raise KaggleVitError(f"{path}: no data rows")
    _check_header(path, list(frame.columns), spec, train)
    pixel_cols = spec.pixel_columns
    pixels = _numeric(path, frame[pixel_cols])
    _check_values(path, pixels, pixel_cols, 0, 255, "pixel value")
    labels = None
    if train:
        lab = _numeric(path, frame[[spec.label_column]])
        _check_values(path, lab, [spec.label_column], 0, spec.num_classes - 1, "label")
        labels = lab[:, 0].astype(np.int64)
    if spec.id_column in frame.columns:
        ids = _numeric(path, frame[[spec.id_column]])
        _check_values(path, ids, [spec.id_column], -(2**62), 2**62, "id")
        ids = ids[:, 0].astype(np.int64)
    else:
        ids = np.arange(spec.id_start, spec.id_start + len(frame), dtype=np.int64)
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        r = int(np.argmax(dup))
        raise KaggleVitError(f"{path}: row {r + 1}, column '{spec.id_column}': duplicate id {ids[r]}")
    h, w, c = spec.height, spec.width, spec.channels
    images = pixels.astype(np.uint8).reshape(-1, h, w, c).transpose(0, 3, 1, 2)
    return ImageTable(np.ascontiguousarray(images), labels, ids)


def _cache_key(path: Path, spec: CompetitionSpec, train: bool) -> str:
    st = path.stat()
    fields = (CACHE_VERSION, st.st_size, st.st_mtime_ns, train, spec.label_column, spec.pixel_column,
              spec.id_column, spec.id_start, spec.height, spec.width, spec.channels, spec.num_classes)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def cache_path(path: Path) -> Path:
    """Where the parsed arrays of a CSV are cached: beside it."""
    return path.with_name(path.name + ".kvcache.npz")


def load_image_csv(path: str | os.PathLike[str], spec: CompetitionSpec, train: bool) -> ImageTable:
    """Load a train/test CSV, from the validated cache when the CSV has not changed since."""
    path = Path(path)
    if not path.is_file():
        raise KaggleVitError(f"{path}: file not found")
    key, cached = _cache_key(path, spec, train), cache_path(path)
    if cached.exists():
        try:
            with np.load(cached, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    labels = z["labels"] if train else None
                    return ImageTable(z["images"], labels, z["ids"])
        except (OSError, KeyError, ValueError):
            pass
    table = parse_image_csv(path, spec, train)
    labels = table.labels if table.labels is not None else np.zeros(0, np.int64)
    try:
        with atomic_path(cached) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, key=np.array(key), images=table.images, labels=labels, ids=table.ids)
    except OSError:
        pass  # a read-only input folder (Kaggle's /kaggle/input) just means no cache
    return table


def load_sample_ids(path: Path, spec: CompetitionSpec) -> np.ndarray:
    """Ids of the sample submission, checking its columns."""
    frame = _read_csv(path)
    if list(frame.columns) != list(spec.submission_columns):
        raise KaggleVitError(f"{path}: row 0: columns {list(frame.columns)}, expected {list(spec.submission_columns)}")
    ids = _numeric(path, frame[[spec.id_column]])
    _check_values(path, ids, [spec.id_column], -(2**62), 2**62, "id")
    return ids[:, 0].astype(np.int64)


@dataclass(frozen=True)
class CompetitionData:
    """A competition's validated training and test tables and where they came from."""

    spec: CompetitionSpec
    data_dir: Path
    train: ImageTable
    test: ImageTable


def load_competition(spec: CompetitionSpec, data_dir: str | os.PathLike[str]) -> CompetitionData:
    """Load and validate train, test and sample submission: the checks every command runs first."""
    data_dir = Path(data_dir)
    train = load_image_csv(data_dir / spec.train_file, spec, train=True)
    test = load_image_csv(data_dir / spec.test_file, spec, train=False)
    sample_path = data_dir / spec.sample_submission_file
    sample_ids = load_sample_ids(sample_path, spec)
    if len(sample_ids) != len(test):
        raise KaggleVitError(f"{sample_path}: {len(sample_ids)} rows, but {spec.test_file} has {len(test)}")
    mismatch = sample_ids != test.ids
    if mismatch.any():
        r = int(np.argmax(mismatch))
        raise KaggleVitError(
            f"{sample_path}: row {r + 1}, column '{spec.id_column}': id {sample_ids[r]} does not match "
            f"{spec.test_file} row {r + 1} (id {test.ids[r]})"
        )
    return CompetitionData(spec, data_dir, train, test)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 scaled to [-1, 1]."""
    return images.float().mul_(1.0 / 127.5).sub_(1.0)


Transform = Callable[..., dict]


class ImageDataset(Dataset):
    """uint8 (N, C, H, W) images → float tensors in [-1, 1], with labels when given.

    `__getitems__` builds a whole batch at once (one stack, one scale), so a DataLoader built with
    `collate_fn=keep_batch` has no per-item collation overhead. An albumentations `transform`
    sees uint8 (H, W, C) arrays, as it expects: each image alone (`group=1`), or `group` images
    stacked as channels that share one random draw, which makes augmentation ~7× faster on the CPU.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, transform: Transform | None = None,
                 group: int = 1):
        self.images = images
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.group = max(1, group)

    def __len__(self) -> int:
        return len(self.images)

    def _batch_uint8(self, indices: list[int]) -> torch.Tensor:
        batch = self.images[np.asarray(indices)]
        if self.transform is not None:
            batch = np.concatenate([self._augment(batch[i : i + self.group]) for i in range(0, len(batch), self.group)])
        return torch.from_numpy(np.ascontiguousarray(batch))

    def _augment(self, images: np.ndarray) -> np.ndarray:
        """One albumentations call for a group of (G, C, H, W) images stacked as G*C channels: they
        share one random draw, and the per-call overhead (~190 µs) is paid once per group."""
        g, c, h, w = images.shape
        stacked = np.ascontiguousarray(images.reshape(g * c, h, w).transpose(1, 2, 0))
        out = self.transform(image=stacked)["image"].reshape(h, w, g * c)
        return out.transpose(2, 0, 1).reshape(g, c, h, w)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        x = to_float(self._batch_uint8(indices))
        if self.labels is None:
            return (x,)
        return x, self.labels[torch.as_tensor(indices)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.__getitems__([index]))


def keep_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """DataLoader collate for ImageDataset: the batch is already built."""
    return batch


def make_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified, shuffled, seeded fold number (1..n_folds) for every row."""
    from sklearn.model_selection import StratifiedKFold

    if n_folds < 2:
        raise KaggleVitError(f"--folds must be at least 2, got {n_folds}")
    counts = np.bincount(labels)
    if counts[counts > 0].min() < n_folds:
        raise KaggleVitError(f"the rarest class has {counts[counts > 0].min()} rows, fewer than {n_folds} folds")
    folds = np.full(len(labels), -1, dtype=np.int64)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, valid) in enumerate(skf.split(np.zeros(len(labels)), labels)):
        folds[valid] = k + 1
    return folds


def save_folds(path: Path, folds: np.ndarray, labels: np.ndarray) -> Path:
    """Save the fold assignment as CSV (row, label, fold) atomically."""
    frame = pd.DataFrame({"row": np.arange(len(folds)), "label": labels, "fold": folds})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def load_or_make_folds(path: Path, labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Reuse saved folds when they match the data; otherwise make and save them."""
    if path.exists():
        frame = pd.read_csv(path)
        same = len(frame) == len(labels) and np.array_equal(frame["label"].to_numpy(), labels)
        if same and frame["fold"].max() == n_folds:
            return frame["fold"].to_numpy(np.int64)
        raise KaggleVitError(f"{path}: saved folds do not match the data or --folds {n_folds}; delete it to re-split")
    folds = make_folds(labels, n_folds, seed)
    save_folds(path, folds, labels)
    return folds
