"""Kaggle's CSVs read and validated: any CSV (one line naming file and row for every way it can
fail), pixel CSVs as image tables cached memory-mapped, and the sample submission's columns
(the torch side is `train.dataset`).

Rows are numbered from 1 for the first data row (the header is row 0), as a spreadsheet
shows them after its header line; errors name file, row and column.
"""
from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import KaggleVitError
from ..io import read_json, write_json
from ..notices import notice
from ..spec import CompetitionSpec
from .cache import cache_root, read_cached, replace_stale, write_cached

CACHE_VERSION = 2


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


def _refuse_compressed(path: Path) -> None:
    """A compressed file under a .csv name (a gzip or zip renamed) is not CSV text."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    kind = "gzip" if head[:2] == b"\x1f\x8b" else "zip" if head == b"PK\x03\x04" else None
    if kind:
        suffix = ".gz" if kind == "gzip" else ".zip"
        raise KaggleVitError(f"{path}: {kind}-compressed data, not CSV text; rename it to {path.name}{suffix} "
                             f"and kaggle-vit unpacks it")


def _first_undecodable_row(path: Path) -> str:
    """Where the first byte that is not UTF-8 sits, as 'row R' (the header is row 0)."""
    with open(path, "rb") as fh:
        for row, line in enumerate(fh):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"row {row}: byte 0x{line[error.start]:02x} at character {error.start + 1} is not UTF-8 text"
    return "not UTF-8 text"


def _header(path: Path) -> list[str]:
    """The header's column names, refusing text that is not UTF-8 and repeated names."""
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        names = next(csv.reader([first.decode("utf-8-sig")]), [])
    except UnicodeDecodeError:
        raise KaggleVitError(f"{path}: {_first_undecodable_row(path)}; save the file as UTF-8") from None
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if name in seen:
            raise KaggleVitError(f"{path}: row 0: column '{name}' appears twice (header fields {seen[name]} and {position})")
        seen[name] = position
    return names


def _ragged_row(path: Path, n_fields: int) -> str:
    """The first data row whose field count differs from the header's."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row, fields in enumerate(csv.reader(fh)):
            if row > 0 and fields and len(fields) != n_fields:
                return f"row {row}: {len(fields)} fields, but the header has {n_fields}"
    return "rows and header differ in field count"


def read_csv(path: Path, text: bool = False) -> pd.DataFrame:
    """Read a CSV as pandas does (`text`: every cell as the string written, as for ids and labels),
    turning every way it can fail into one line naming file and row."""
    if not path.is_file():
        raise KaggleVitError(f"{path}: file not found")
    _refuse_compressed(path)
    header = _header(path)
    try:
        with warnings.catch_warnings():
            # a first data row longer than the header would otherwise silently become the index
            warnings.simplefilter("error", pd.errors.ParserWarning)
            if text:
                return pd.read_csv(path, index_col=False, dtype=str, keep_default_na=False)
            return pd.read_csv(path, low_memory=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise KaggleVitError(f"{path}: file is empty") from None
    except (pd.errors.ParserWarning, pd.errors.ParserError):
        raise KaggleVitError(f"{path}: {_ragged_row(path, len(header))}") from None
    except UnicodeDecodeError:
        raise KaggleVitError(f"{path}: {_first_undecodable_row(path)}; save the file as UTF-8") from None


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
    frame = read_csv(path)
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
              spec.pixel_start, spec.id_column, spec.id_start, spec.height, spec.width, spec.channels, spec.num_classes)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


CACHE_PARTS = ("images", "labels", "ids")


def _cache_files(path: Path, key: str) -> dict[str, Path]:
    """A CSV's cache: one .npy per array, and a JSON with the key and row count, written last (its
    presence says the arrays are complete). In the cache folder (`cache.cache_root`)."""
    stem = cache_root(path.parent) / f"{path.name}.{key}"
    return {**{part: stem.with_name(f"{stem.name}.{part}.npy") for part in CACHE_PARTS},
            "key": stem.with_name(f"{stem.name}.json")}


def cache_path(path: Path, spec: CompetitionSpec, train: bool) -> Path:
    """Where a CSV's images are cached as they are now (a memory-mapped .npy; labels and ids beside it):
    a changed CSV (size, modification time) or spec has another cache."""
    return _cache_files(path, _cache_key(path, spec, train))["images"]


def _read_cache(files: dict[str, Path], key: str, spec: CompetitionSpec, train: bool) -> ImageTable | None:
    """The cached arrays, memory-mapped, or None when there is no complete cache or it cannot be read
    (it is rebuilt: a cache is disposable, so a truncated or corrupt one must never stop a command)."""
    if not files["key"].is_file():
        return None
    try:
        record = read_json(files["key"])
        if record["key"] != key:
            raise ValueError(f"key {record['key']}")
        n = int(record["rows"])
    except Exception as error:  # noqa: BLE001 - any failure to read a disposable file means: rebuild it
        notice(f"{files['key']}: unreadable cache ({type(error).__name__}); rebuilding it")
        return None
    shapes = {"images": ((n, spec.channels, spec.height, spec.width), np.uint8), "labels": ((n,), np.int64),
              "ids": ((n,), np.int64)}
    arrays = {}
    for part in CACHE_PARTS if train else ("images", "ids"):
        arrays[part] = read_cached(files[part], *shapes[part])
        if arrays[part] is None:
            return None
    return ImageTable(arrays["images"], arrays.get("labels"), arrays["ids"])


def _write_cache(path: Path, files: dict[str, Path], key: str, table: ImageTable) -> None:
    """Each array of the CSV at `path` into its .npy, then the key; then the CSV's older caches
    go, if kaggle-vit recorded them as its own (`cache.replace_stale`)."""
    arrays = {"images": table.images, "labels": table.labels, "ids": table.ids}
    written = [part for part in CACHE_PARTS if arrays[part] is not None]
    files["key"].parent.mkdir(parents=True, exist_ok=True)
    for part in written:
        write_cached(files[part], arrays[part].shape, arrays[part].dtype, [arrays[part]])
    write_json(files["key"], {"key": key, "rows": len(table)})
    parts = "|".join(CACHE_PARTS)
    replace_stale(files["key"].parent, rf"{re.escape(path.name)}\.[0-9a-f]{{16}}(\.({parts})\.npy|\.json)",
                  [files[part] for part in (*written, "key")])


def load_image_csv(path: str | os.PathLike[str], spec: CompetitionSpec, train: bool) -> ImageTable:
    """Load a train/test CSV, memory-mapped from its cache when the CSV has not changed since; a
    cache that cannot be written (a full disk) only means parsing the CSV again next time."""
    path = Path(path)
    if not path.is_file():
        raise KaggleVitError(f"{path}: file not found")
    key = _cache_key(path, spec, train)
    files = _cache_files(path, key)
    table = _read_cache(files, key, spec, train)
    if table is not None:
        return table
    table = parse_image_csv(path, spec, train)
    try:
        _write_cache(path, files, key, table)
    except OSError as error:
        notice(f"{error.filename or files['key']}: cannot write the cache ({error.strerror}); "
               f"{path.name} is parsed again next time")
        return table
    return _read_cache(files, key, spec, train) or table


def check_sample_header(path: Path, spec: CompetitionSpec) -> None:
    """The sample submission's columns are the ones the spec writes (its [columns] submission, or
    the id and one column per class label): a spec that disagrees would write a file Kaggle refuses.
    Skipped while the class labels that name the columns are still unknown."""
    if spec.submission_form == "class_probabilities" and not spec.class_labels:
        return
    found, expected = _header(path), spec.submission_header()
    if found == expected:
        return
    if max(len(found), len(expected)) <= 8:
        differ = f"columns {', '.join(found)}, but {spec.path} expects {', '.join(expected)} ([columns] submission)"
    else:  # one column per class: the first that differs
        k = next(i for i in range(max(len(found), len(expected))) if found[i:i + 1] != expected[i:i + 1])
        at = [f"'{columns[k]}'" if k < len(columns) else "none" for columns in (found, expected)]
        differ = (f"{len(found)} columns, column {k + 1} {at[0]}, but {spec.path} expects {len(expected)}, "
                  f"column {k + 1} {at[1]} (the id and one per class label)")
    raise KaggleVitError(f"{path}: row 0: {differ}")


def load_sample_ids(path: Path, spec: CompetitionSpec) -> np.ndarray:
    """Ids of the sample submission, checking its columns."""
    frame = read_csv(path)
    check_sample_header(path, spec)
    ids = _numeric(path, frame[[spec.id_column]])
    _check_values(path, ids, [spec.id_column], -(2**62), 2**62, "id")
    return ids[:, 0].astype(np.int64)
