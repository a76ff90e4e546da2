"""Image files → one uint8 (N, C, H, W) array, decoded once and cached memory-mapped.

Files are decoded with Pillow (PNG, JPEG, BMP, TIFF; a damaged file raises, where OpenCV prints
library warnings and goes on), converted to the spec's channel count and resized to its size. The
array is written once as a `.npy` and memory-mapped afterwards, so a set larger than RAM works and
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
from pathlib import Path

import numpy as np

from .errors import KaggleVitError
from .io import atomic_path, size_text, write_json
from .notices import notice
from .progress import track

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CACHE_VERSION = 2
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
    An image over Pillow's pixel limit (a decompression bomb) is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
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


def _read_cached(path: Path, n: int, shape: tuple[int, int, int]) -> np.ndarray | None:
    try:
        array = np.load(path, mmap_mode="c")
        if array.shape == (n, *shape) and array.dtype == np.uint8:
            return array
        raise ValueError(f"shape {array.shape}")
    except Exception as error:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        notice(f"{path}: unreadable cache ({type(error).__name__}); rebuilding it")
        return None


def _check_room(target: Path, n_bytes: int) -> None:
    """Refuse, before decoding anything, a cache larger than the free space of its disk."""
    free = shutil.disk_usage(target.parent).free
    if n_bytes > free:
        raise KaggleVitError(f"{target}: the image cache needs {size_text(n_bytes)}, but its disk has {size_text(free)} free; "
                             f"free some space or choose a smaller [image] size")


def _write_cache(tmp: Path, paths: list[Path], shape: tuple[int, int, int], split: str) -> None:
    """Decode every file into a .npy with ordinary writes: a full disk is an OSError (a memory
    map would die of SIGBUS instead)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(paths), *shape)}
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.writelines(decode(path, *shape[1:], shape[0]).tobytes()
                      for path in track(paths, f"decoding {len(paths):,} {split} images"))


def _written(root: Path) -> dict[str, list[int]]:
    try:
        record = json.loads((root / WRITTEN).read_text(encoding="utf-8"))
        return {str(k): list(v) for k, v in record.items()} if isinstance(record, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}  # no record: nothing is known to be ours, so nothing is deleted


def _replace_stale(root: Path, split: str, target: Path) -> None:
    """Record `target` as written by kaggle-vit and delete this split's older caches: only files
    it recorded, still as it wrote them (same size and modification time)."""
    record, pattern = _written(root), re.compile(rf"{split}-[0-9a-f]{{16}}\.npy")
    for name, stamp in list(record.items()):
        path = root / name
        if pattern.fullmatch(name) and path != target:
            if path.is_file() and not path.is_symlink() and [path.stat().st_size, path.stat().st_mtime_ns] == stamp:
                path.unlink()
            del record[name]
    st = target.stat()
    record[target.name] = [st.st_size, st.st_mtime_ns]
    write_json(root / WRITTEN, record)


def load_images(paths: list[Path], folder: Path, split: str, height: int, width: int, channels: int) -> np.ndarray:
    """Every file decoded into one memory-mapped uint8 (N, C, H, W) array, from the cache when no
    file changed; otherwise decoded once (with a progress bar) and cached, after checking it fits."""
    key = _key(paths, folder, height, width, channels)
    root = cache_root(folder)
    target = root / f"{split}-{key}.npy"
    shape = (channels, height, width)
    if target.exists():
        cached = _read_cached(target, len(paths), shape)
        if cached is not None:
            return cached
    root.mkdir(parents=True, exist_ok=True)
    _check_room(target, len(paths) * channels * height * width)
    try:
        with atomic_path(target) as tmp:
            _write_cache(tmp, paths, shape, split)
    except OSError as error:
        raise KaggleVitError(f"{target}: cannot write the image cache ({error.strerror}); it needs "
                             f"{size_text(len(paths) * channels * height * width)}") from None
    _replace_stale(root, split, target)
    return np.load(target, mmap_mode="c")
