"""Image files → one uint8 (N, C, H, W) array, decoded once and cached memory-mapped.

Files are decoded with Pillow (PNG, JPEG, BMP, TIFF; a damaged file raises, where OpenCV prints
library warnings and goes on), converted to the spec's channel count and resized to its size: by
several threads for a large set (Pillow decodes and resizes without the GIL), and a large JPEG at reduced size (Pillow's draft mode decodes
1/2, 1/4 or 1/8 of it directly, never below the target size). The array is written once as a `.npy` and memory-mapped afterwards, so a set larger than RAM works and
later epochs and commands never decode a file again. The cache is keyed by every file's path
(relative to the data folder, however that is spelt), size and modification time: adding, removing
or changing a file rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import KaggleVitError
from .io import atomic_path, size_text, write_json
from .notices import notice
from .progress import track

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CACHE_VERSION = 3  # 3: JPEGs decoded in draft mode
DECODE_CHUNK = 32  # images per task of the decoding threads
WRITTEN = "written.json"  # the cache files kaggle-vit wrote: {name: [size, mtime_ns]}, the only ones it deletes


def _eight_bit(img):
    """16-bit grey (I;16, I;16B, I) as 8 bits by its high byte, where convert('L') clips at 255."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L")
    return img


def decode(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image file as uint8 (channels, height, width): grey or RGB, resized when it differs.
    An image over Pillow's pixel limit (a decompression bomb) is refused before it is decoded, under
    `bombs_refused` (Pillow only warns below twice its limit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft("L" if channels == 1 else "RGB", (width, height))  # JPEG only; a no-op otherwise
            img.load()
            img = _eight_bit(img).convert("L" if channels == 1 else "RGB")
        if img.size != (width, height):
            shrink = img.size[0] > width or img.size[1] > height
            img = img.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise KaggleVitError(f"{path}: refused as a possible decompression bomb: {str(error).rstrip('.')}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise KaggleVitError(f"{path}: cannot decode the image ({error})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@contextmanager
def bombs_refused() -> Iterator[None]:
    """Pillow's decompression-bomb warning as an error, for every decoding thread: warning filters
    are global, so they are set once here, never per thread (catch_warnings is not thread-safe)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _decode_chunk(paths: list[Path], height: int, width: int, channels: int) -> np.ndarray:
    return np.stack([decode(path, height, width, channels) for path in paths])


def decode_threads(n_images: int) -> int:
    """How many threads decode `n_images`: one per usable core, at most one per chunk."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, -(-n_images // DECODE_CHUNK)))


def decode_all(paths: list[Path], height: int, width: int, channels: int, description: str) -> Iterator[np.ndarray]:
    """Every file decoded, in order, as arrays of whole images, by `decode_threads` threads. Threads,
    not processes: measured faster (no start-up, no copies back; see benchmarks/RESULTS.md), and
    nothing re-imports the caller's script."""
    threads = decode_threads(len(paths))
    if threads == 1:
        yield from (decode(path, height, width, channels) for path in track(paths, description))
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="kaggle-vit-decode")
    try:
        tasks = [pool.submit(_decode_chunk, paths[i:i + DECODE_CHUNK], height, width, channels)
                 for i in range(0, len(paths), DECODE_CHUNK)]
        for task in track(tasks, description, at_least=500 // DECODE_CHUNK):
            yield task.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error or Ctrl-C: no chunk is decoded after it


def _key(paths: list[Path], folder: Path, height: int, width: int, channels: int) -> str:
    digest = hashlib.sha256(repr((CACHE_VERSION, height, width, channels)).encode())
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            raise KaggleVitError(f"{path}: image file not found") from None
        digest.update(f"{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


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
    from .fetch import cache_dir

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


def load_images(paths: list[Path], folder: Path, split: str, height: int, width: int, channels: int) -> np.ndarray:
    """Every file decoded into one memory-mapped uint8 (N, C, H, W) array, from the cache when no
    file changed; otherwise decoded once (with a progress bar) and cached, after checking it fits."""
    key = _key(paths, folder, height, width, channels)
    root = cache_root(folder)
    target = root / f"{split}-{key}.npy"
    shape = (len(paths), channels, height, width)
    if target.exists():
        cached = read_cached(target, shape, np.uint8)
        if cached is not None:
            return cached
    root.mkdir(parents=True, exist_ok=True)
    check_room(target, int(np.prod(shape)))
    try:
        with bombs_refused():
            write_cached(target, shape, np.uint8,
                         decode_all(paths, height, width, channels, f"decoding {len(paths):,} {split} images"))
    except OSError as error:
        raise KaggleVitError(f"{target}: cannot write the image cache ({error.strerror}); it needs "
                             f"{size_text(int(np.prod(shape)))}") from None
    replace_stale(root, rf"{split}-[0-9a-f]{{16}}\.npy", [target])
    return np.load(target, mmap_mode="c")
