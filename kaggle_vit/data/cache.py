"""Disposable caches of decoded arrays, as `.npy` files memory-mapped when read: where they go
(beside the data, or under the user's cache), how they are written (atomically, after checking the
disk has room) and read back (a damaged one is rebuilt, never fatal), which stale ones are removed
(only files kaggle-vit recorded writing), and how a fold worker maps the rows its parent maps."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import KaggleVitError
from ..io import atomic_path, size_text, write_json
from ..notices import notice

WRITTEN = "written.json"  # the cache files kaggle-vit wrote: {name: [size, mtime_ns]}, the only ones it deletes


def cache_dir() -> Path:
    """Where downloads are kept between runs ($KAGGLE_VIT_CACHE or ~/.cache/kaggle-vit)."""
    return Path(os.environ.get("KAGGLE_VIT_CACHE", Path.home() / ".cache" / "kaggle-vit"))


def cache_root(folder: Path) -> Path:
    """Where decoded images are cached: beside them (`.kvcache/`), or, when that folder cannot be
    written (Kaggle's /kaggle/input), under the user's cache. A `.kvcache` link is refused: the
    cache is written only inside the data folder."""
    beside = folder / ".kvcache"
    if beside.is_symlink():
        raise KaggleVitError(f"{beside}: a symbolic link (to {os.readlink(beside)}); kaggle-vit writes its image "
                             f"cache only inside the data folder: remove the link")
    if os.access(folder, os.W_OK):
        return beside
    return cache_dir() / "images" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]


def read_cached(path: Path, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray | None:
    """A cached .npy memory-mapped copy-on-write (torch takes it without a warning, nothing is
    written back), or None, with a one-line notice, when it cannot be read or is not of `shape` and
    `dtype`: a cache is disposable, so it is rebuilt, never fatal."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
        if array.shape == shape and array.dtype == np.dtype(dtype):
            return array
        raise ValueError(f"shape {array.shape}")
    except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        notice(f"{path}: unreadable cache ({type(error).__name__}); rebuilding it")
        return None


def check_room(target: Path, n_bytes: int) -> None:
    """Refuse, before decoding anything, a cache larger than the free space of its disk."""
    free = shutil.disk_usage(target.parent).free
    if n_bytes > free:
        raise KaggleVitError(f"{target}: the image cache needs {size_text(n_bytes)}, but its disk has {size_text(free)} free; "
                             f"free some space or choose a smaller [image] size")


def write_cached(target: Path, shape: tuple[int, ...], dtype: np.dtype | type, chunks: Iterable[np.ndarray]) -> None:
    """Write a .npy atomically from `chunks` (rows in order) with ordinary writes: a full disk is
    an OSError that names `target` (a memory map would die of SIGBUS instead)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(n) for n in shape)}
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.writelines(np.ascontiguousarray(chunk, dtype=dtype).data for chunk in chunks)


def _written(root: Path) -> dict[str, list[int]]:
    try:
        record = json.loads((root / WRITTEN).read_text(encoding="utf-8"))
        return {str(k): list(v) for k, v in record.items()} if isinstance(record, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}  # no record: nothing is known to be ours, so nothing is deleted


def replace_stale(root: Path, pattern: str, targets: list[Path]) -> None:
    """Record `targets` as written by kaggle-vit and delete the older caches of the same source (recorded
    names that fully match the regular expression `pattern`): only files it recorded, still as it wrote
    them (same size and modification time)."""
    record, names = _written(root), re.compile(pattern)
    for name, stamp in list(record.items()):
        path = root / name
        if names.fullmatch(name) and path not in targets:
            if path.is_file() and not path.is_symlink() and [path.stat().st_size, path.stat().st_mtime_ns] == stamp:
                path.unlink()
            del record[name]
    for target in targets:
        st = target.stat()
        record[target.name] = [st.st_size, st.st_mtime_ns]
    write_json(root / WRITTEN, record)


@dataclass(frozen=True)
class MappedRows:
    """Rows `start`..`stop` of a memory-mapped array file: how a fold worker opens the cache the
    parent opened (the same pages, shared), where a copy would double the memory."""

    path: str
    offset: int  # bytes before row 0 (a .npy's header)
    dtype: str
    shape: tuple[int, ...]  # of one row
    start: int
    stop: int

    def open(self) -> np.ndarray:
        """The rows, mapped copy-on-write as the cache is."""
        row = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        return np.memmap(self.path, self.dtype, "c", self.offset + self.start * row,
                         (self.stop - self.start, *self.shape))


def mapped_rows(array: np.ndarray) -> MappedRows | None:
    """Where `array` lies in the file it is memory-mapped from, when it is a run of whole rows of it
    (a cache, or a slice of one); None for an array in memory."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root, np.memmap) or root.filename is None or root.ndim == 0:
        return None
    whole_rows = array.ndim == root.ndim and array.shape[1:] == root.shape[1:] and array.dtype == root.dtype
    if not whole_rows or not array.flags.c_contiguous:
        return None
    start, rest = divmod(array.ctypes.data - root.ctypes.data, max(1, root[:1].nbytes))
    if rest or not 0 <= start <= start + len(array) <= len(root):
        return None
    return MappedRows(str(root.filename), root.offset, array.dtype.str, tuple(array.shape[1:]), start, start + len(array))
