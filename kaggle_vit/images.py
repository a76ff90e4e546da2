"""Image files → one uint8 (N, C, H, W) array, decoded once and cached memory-mapped.

Files are decoded with Pillow (PNG, JPEG, BMP, TIFF; a damaged file raises, where OpenCV prints
library warnings and goes on), converted to the spec's channel count and resized to its size. The
array is written once as a `.npy` and memory-mapped afterwards, so a set larger than RAM works and
later epochs and commands never decode a file again. The cache is keyed by every file's path, size
and modification time: adding, removing or changing a file rebuilds it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import KaggleVitError
from .io import atomic_path
from .notices import notice
from .progress import track

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CACHE_VERSION = 1


def decode(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image file as uint8 (channels, height, width): grey or RGB, resized when it differs."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                shrink = img.size[0] > width or img.size[1] > height
                img = img.resize((width, height), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise KaggleVitError(f"{path}: cannot decode the image ({error})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _key(paths: list[Path], height: int, width: int, channels: int) -> str:
    digest = hashlib.sha256(repr((CACHE_VERSION, height, width, channels)).encode())
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            raise KaggleVitError(f"{path}: image file not found") from None
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_root(folder: Path) -> Path:
    """Where decoded images are cached: beside them (`.kvcache/`), or, when that folder cannot be
    written (Kaggle's /kaggle/input), under the user's cache."""
    beside = folder / ".kvcache"
    if os.access(folder, os.W_OK):
        return beside
    from .fetch import cache_dir

    return cache_dir() / "images" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]


def _read_cached(path: Path, n: int, shape: tuple[int, int, int]) -> np.ndarray | None:
    try:
        array = np.load(path, mmap_mode="c")
        if array.shape == (n, *shape) and array.dtype == np.uint8:
            return array
        raise ValueError(f"shape {array.shape}")
    except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        notice(f"{path}: unreadable cache ({type(error).__name__}); rebuilding it")
        return None


def load_images(paths: list[Path], folder: Path, split: str, height: int, width: int, channels: int) -> np.ndarray:
    """Every file decoded into one memory-mapped uint8 (N, C, H, W) array, from the cache when no
    file changed; otherwise decoded once (with a progress bar) and cached."""
    key = _key(paths, height, width, channels)
    root = cache_root(folder)
    target = root / f"{split}-{key}.npy"
    shape = (channels, height, width)
    if target.exists():
        cached = _read_cached(target, len(paths), shape)
        if cached is not None:
            return cached
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *shape))
        for i, path in enumerate(track(paths, f"decoding {len(paths):,} {split} images")):
            out[i] = decode(path, height, width, channels)
        out.flush()
        del out
    for stale in root.glob(f"{split}-*.npy"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return np.load(target, mmap_mode="c")
