"""Image files → one uint8 (N, C, H, W) array, decoded once and cached memory-mapped.

Files are decoded with Pillow (PNG, JPEG, BMP, TIFF; a damaged file raises, where OpenCV prints
library warnings and goes on), converted to the spec's channel count and resized to its size: by one
thread per core (Pillow decodes and resizes without the GIL), and a large JPEG at reduced size
(Pillow's draft mode decodes 1/2, 1/4 or 1/8 of it directly, never below the target size). The
array is written once as a `.npy` and memory-mapped afterwards, so a set larger than RAM works and
later epochs and commands never decode a file again. The cache is keyed by every file's path
(relative to the data folder, however that is spelt), size and modification time: adding, removing
or changing a file rebuilds it.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import KaggleVitError
from ..io import size_text
from ..progress import track
from .cache import cache_root, check_room, read_cached, replace_stale, write_cached

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CACHE_VERSION = 3  # 3: JPEGs decoded in draft mode
DECODE_CHUNK = 32  # images per task of the decoding threads


def _eight_bit(img):
    """16-bit grey (I;16, I;16B, I) as 8 bits by its high byte, where convert('L') clips at 255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L")
    return img


def decode(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image file as uint8 (channels, height, width): grey or RGB, resized when it differs.
    An image over Pillow's pixel limit (a decompression bomb) is refused before it is decoded, under
    `bombs_refused` (Pillow only warns below twice its limit)."""
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
    pool = ThreadPoolExecutor(decode_threads(len(paths)), thread_name_prefix="kaggle-vit-decode")
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


def load_images(paths: list[Path], folder: Path, split: str, height: int, width: int, channels: int) -> np.ndarray:
    """Every file decoded into one memory-mapped uint8 (N, C, H, W) array, from the cache when no
    file changed; otherwise decoded once (with a progress bar) and cached, after checking it fits."""
    key = _key(paths, folder, height, width, channels)
    root = cache_root(folder)
    target = root / f"{split}-{key}.npy"
    shape = (len(paths), channels, height, width)
    n_bytes = int(np.prod(shape))
    if target.exists():
        cached = read_cached(target, shape, np.uint8)
        if cached is not None:
            return cached
    root.mkdir(parents=True, exist_ok=True)
    check_room(target, n_bytes)
    try:
        with bombs_refused():
            write_cached(target, shape, np.uint8,
                         decode_all(paths, height, width, channels, f"decoding {len(paths):,} {split} images"))
    except OSError as error:
        raise KaggleVitError(f"{target}: cannot write the image cache ({error.strerror}); it needs "
                             f"{size_text(n_bytes)}") from None
    replace_stale(root, rf"{split}-[0-9a-f]{{16}}\.npy", [target])
    return np.load(target, mmap_mode="c")
