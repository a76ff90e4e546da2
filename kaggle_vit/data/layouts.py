"""A competition's files in its layout → CompetitionData (`load_competition`), every path confined
to the competition folder. `pixels`: pixel CSVs (`tables`); image files: a labels CSV beside an
image folder (`files`), or one folder per class (`folders`). Each becomes the same validated
ImageTable as a pixel CSV, with labels as class indices and the class labels the competition
writes in its submissions."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import KaggleVitError
from ..spec import CompetitionSpec, is_inside, shown
from .images import IMAGE_EXTENSIONS, load_images
from .tables import ImageTable, check_sample_header, load_image_csv, load_sample_ids, read_csv


def _text_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A CSV read as text (ids and labels stay as written), with the named columns, no empty cell."""
    frame = read_csv(path, text=True)  # ids such as 0012 keep their zeros
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KaggleVitError(f"{path}: row 0: missing column '{missing[0]}' (found {', '.join(map(str, frame.columns))})")
    frame = frame[list(columns)]
    for column in columns:
        empty = (frame[column].str.strip() == "").to_numpy()
        if empty.any():
            raise KaggleVitError(f"{path}: row {int(np.argmax(empty)) + 1}, column '{column}': empty cell")
    if len(frame) == 0:
        raise KaggleVitError(f"{path}: no data rows")
    return frame


def _check_unique(path: Path, ids: list[str], column: str) -> None:
    seen: set[str] = set()
    for row, image_id in enumerate(ids, start=1):
        if image_id in seen:
            raise KaggleVitError(f"{path}: row {row}, column '{column}': duplicate id '{image_id}'")
        seen.add(image_id)


def _files_in(folder: Path) -> dict[str, Path]:
    """Image files directly in `folder`, by name."""
    if not folder.is_dir():
        raise KaggleVitError(f"{folder}: image folder not found")
    return {e.name: Path(e.path) for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)}


def _names_for(image_id: str, extension: str) -> tuple[str, ...]:
    """The file names an id may have: as written, or with the spec's extension (or each image one)."""
    return (image_id, image_id + extension) if extension else (image_id, *(image_id + e for e in IMAGE_EXTENSIONS))


def _holds(folder: Path, files: dict[str, Path]) -> str:
    """What a folder holds, in a few names: what an id that found no file can be compared with."""
    if files:
        return f"the folder holds {len(files):,} image files, such as {shown(sorted(files), 3)}"
    others = sorted(os.listdir(folder))
    return f"the folder holds no {'/'.join(IMAGE_EXTENSIONS)} file, only {shown(others, 3)}" if others else "the folder is empty"


def _paths_for(ids: list[str], folder: Path, extension: str, source: Path, column: str) -> list[Path]:
    """Each id's image file, directly in `folder` (an id is a file name, never a path)."""
    files = _files_in(folder)
    paths = []
    for row, image_id in enumerate(ids, start=1):
        where = f"{source}: row {row}, column '{column}': id '{image_id}'"
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            raise KaggleVitError(f"{where} is a path; an id names a file directly in {folder}")
        names = _names_for(image_id, extension)
        found = next((files[name] for name in names if name in files), None)
        if found is None:
            raise KaggleVitError(f"{where} has no image file in {folder} (tried {', '.join(names)}; {_holds(folder, files)})")
        paths.append(found)
    return paths


def class_names_of(labels: list[str]) -> tuple[str, ...]:
    """The classes the training labels hold (their class labels): sorted, as numbers when they all are."""
    unique = set(labels)
    numeric = all(u.lstrip("-").isdigit() for u in unique)
    return tuple(sorted(unique, key=int if numeric else str))


def _classes_shown(names: tuple[str, ...]) -> str:
    return f"the {len(names)} classes ({shown(names)})"


def class_indices(labels: list[str], names: tuple[str, ...], source: Path, column: str) -> np.ndarray:
    """Each label's position among the class labels; a label that is not one is named with its row."""
    index = {name: i for i, name in enumerate(names)}
    out = np.empty(len(labels), dtype=np.int64)
    for row, label in enumerate(labels):
        if label not in index:
            raise KaggleVitError(f"{source}: row {row + 1}, column '{column}': label '{label}' is not one of "
                                 f"{_classes_shown(names)}")
        out[row] = index[label]
    return out


def sample_ids(spec: CompetitionSpec, data_dir: Path) -> list[str]:
    """The test ids, in the order the sample submission lists them."""
    path = data_dir / spec.sample_submission_file
    check_sample_header(path, spec)
    frame = _text_csv(path, (spec.submission_columns[0],))
    ids = frame[spec.submission_columns[0]].tolist()
    _check_unique(path, ids, spec.submission_columns[0])
    return ids


def read_files_layout(spec: CompetitionSpec, data_dir: Path):
    """`files`: a labels CSV (id, label) and a folder of training images; test images are the ids of
    the sample submission in the test folder. Returns (train ids, paths, labels as text), (test ids, paths)."""
    labels_csv = data_dir / spec.train_file
    frame = _text_csv(labels_csv, (spec.id_column, spec.label_column))
    ids = frame[spec.id_column].tolist()
    _check_unique(labels_csv, ids, spec.id_column)
    train_paths = _paths_for(ids, data_dir / spec.train_images, spec.image_extension, labels_csv, spec.id_column)
    test_ids = sample_ids(spec, data_dir)
    test_paths = _paths_for(test_ids, data_dir / spec.test_images, spec.image_extension,
                            data_dir / spec.sample_submission_file, spec.submission_columns[0])
    return (ids, train_paths, frame[spec.label_column].tolist()), (test_ids, test_paths)


def read_folders_layout(spec: CompetitionSpec, data_dir: Path):
    """`folders`: train/<class name>/<file> and a test folder; submission ids are the test file
    names (in the sample submission's order when there is one)."""
    root = data_dir / spec.train_images
    if not root.is_dir():
        raise KaggleVitError(f"{root}: training folder not found (one subfolder per class)")
    ids, paths, labels = [], [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _files_in(class_dir)
        if not files:
            raise KaggleVitError(f"{class_dir}: empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files); "
                                 f"add its images or remove it")
        for name, path in sorted(files.items()):
            ids.append(f"{class_dir.name}/{name}")
            paths.append(path)
            labels.append(class_dir.name)
    if not paths:
        raise KaggleVitError(f"{root}: no image files in its class subfolders")
    if (data_dir / spec.sample_submission_file).exists():
        test_ids = sample_ids(spec, data_dir)
        test_paths = _paths_for(test_ids, data_dir / spec.test_images, "", data_dir / spec.sample_submission_file,
                                spec.submission_columns[0])
    else:
        files = _files_in(data_dir / spec.test_images)
        test_ids, test_paths = sorted(files), [files[n] for n in sorted(files)]
    return (ids, paths, labels), (test_ids, test_paths)


def load_image_layout(spec: CompetitionSpec, data_dir: Path):
    """Train and test ImageTables of an image-file competition, and the spec with its class labels
    (the spec's, or discovered from the training labels)."""
    reader = read_files_layout if spec.layout == "files" else read_folders_layout
    (ids, paths, labels), (test_ids, test_paths) = reader(spec, data_dir)
    source = data_dir / (spec.train_file if spec.layout == "files" else spec.train_images)
    spec = spec.with_labels(class_names_of(labels), source)
    names = spec.class_labels
    if spec.submission_form == "class_probabilities" and (data_dir / spec.sample_submission_file).exists():
        check_sample_header(data_dir / spec.sample_submission_file, spec)  # its class columns: known from here
    if spec.layout == "folders":  # a class is a folder: name the folder, not a row and column
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise KaggleVitError(f"{data_dir / spec.train_images / unknown[0]}: class folder '{unknown[0]}' is not one "
                                 f"of {_classes_shown(names)} that {spec.path} [classes] labels lists; rename the folder "
                                 f"or add it to labels")
    indices = class_indices(labels, names, data_dir / spec.train_file, spec.label_column)
    size = (spec.height, spec.width, spec.channels)
    train = ImageTable(load_images(paths, data_dir, "train", *size), indices, np.asarray(ids, dtype=object))
    test = ImageTable(load_images(test_paths, data_dir, "test", *size), None, np.asarray(test_ids, dtype=object))
    return train, test, spec


# the spec's files and folders: (CompetitionSpec field, [files] key)
SPEC_PATHS = (("train_file", "train"), ("test_file", "test"), ("sample_submission_file", "sample_submission"),
              ("solution_file", "solution"), ("train_images", "train_images"), ("test_images", "test_images"))


def confine(spec: CompetitionSpec, data_dir: Path) -> None:
    """Refuse a spec file or folder outside the competition folder (an absolute path, or '..'
    climbing out), before anything is read or written: a spec never reaches another file."""
    for field, key in SPEC_PATHS:
        value = getattr(spec, field)
        if not is_inside(value):
            raise KaggleVitError(f"{spec.path} [files]: {key} = '{value}' is outside the competition folder "
                                 f"{data_dir}; give a path inside it")


@dataclass(frozen=True)
class CompetitionData:
    """A competition's validated training and test tables and where they came from."""

    spec: CompetitionSpec
    data_dir: Path
    train: ImageTable
    test: ImageTable


def load_competition(spec: CompetitionSpec, data_dir: str | os.PathLike[str]) -> CompetitionData:
    """Load and validate train, test and sample submission: the checks every command runs first.
    For image files, the spec that comes back carries the class labels (the spec's, or discovered)."""
    data_dir = Path(data_dir)
    confine(spec, data_dir)
    if spec.layout != "pixels":
        train, test, spec = load_image_layout(spec, data_dir)
        return CompetitionData(spec, data_dir, train, test)
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
