"""Default `cv` + `submit` on small competitions made from real data, beside scikit-learn baselines.

Each competition is written in a real Kaggle layout from real images, with a held-out test set whose
answers are kept apart (`OUT/sets/NAME-solution.csv`, beside the competition's folder): digit-recognizer
pixel CSVs (the offline build's rows), MNIST digits as PNG files in class folders, Fashion-MNIST as PNG
files with a labels CSV of class numbers (Debian's `dataset-fashion-mnist`), and `photos-W`: 32x32 RGB
tiles of scikit-image's seven bundled photographs (`pip install scikit-image`) as PNG files with a
labels CSV naming the photograph (spec `benchmarks/photos.toml`). Each photograph is downscaled to W
columns and cut into a grid of non-overlapping tiles; every third column of tiles is held out, so no
two images (training, held-out, or of two cv folds) share a pixel, while both sets see every part of
each photograph. kaggle-vit runs with
its defaults only (`cv --folds 5`, then `submit`), as a user would, one competition at a time; a logistic
regression and a kNN (k picked by 5-fold CV) are fitted on the same training pixels and scored on the
same held-out rows.

    python benchmarks/small_data.py OUT_DIR [--sets digits-100,mnist-png-200,...] [-- extra cv options]
    python benchmarks/small_data.py OUT_DIR --sets photos-384 --build-only

Prints one markdown row per competition: size, held-out score of kaggle-vit, its wall time, and the
baselines' scores. `--build-only` writes the competitions and prints each one's data folder, spec and
answers, for runs of your own (`kaggle-vit score submission.csv -c SPEC --data-dir DATA --solution ANSWERS`).
"""
from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
N_TEST = 2000
SETS = ("digits-100", "digits-1000", "mnist-png-200", "mnist-png-1000", "fashion-png-200", "fashion-png-1000",
        "digits-42000", "photos-384")  # the default: all but the last two (minutes; scikit-image)
MNIST_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
PHOTOS_SPEC = Path(__file__).with_name("photos.toml")
PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket"]
PHOTO_PATCH = 32
PHOTO_SEED = 0


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (_idx(FASHION / "train-images-idx3-ubyte.gz")[:n], _idx(FASHION / "train-labels-idx1-ubyte.gz")[:n],
            _idx(FASHION / "t10k-images-idx3-ubyte.gz")[:N_TEST], _idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:N_TEST])


def _digits_rows(root: Path, n: int) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """digit-recognizer's layout: the offline build's first n training rows; held-out: its test rows."""
    from kaggle_vit.data.fetch import load_mnist, write_competition_files
    from kaggle_vit.spec import load_spec

    spec = load_spec("digit-recognizer")
    tx, ty, vx, vy = load_mnist()
    pool_x, pool_y = np.concatenate([tx, vx]), np.concatenate([ty, vy])
    order = np.random.default_rng(spec.offline_seed).permutation(len(pool_x))  # the offline build's split
    train, test = order[:spec.offline_n_train][:n], order[spec.offline_n_train:]
    test = test if n >= spec.offline_n_train else test[:N_TEST]
    import dataclasses

    write_competition_files(dataclasses.replace(spec, offline_split="official"), root,
                            pool_x[train], pool_y[train], pool_x[test], pool_y[test])
    return Path(spec.path), pool_x[train], pool_y[train], pool_x[test], pool_y[test]


def _photo_tiles(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The photographs, each downscaled to `width` columns, cut into a grid of non-overlapping
    PHOTO_PATCH-square tiles: every third column of tiles is held out, the rest train; shuffled
    (seeded). No two tiles share a pixel, so neither the held-out rows nor the cv folds do."""
    import skimage.data  # lazy: a benchmark-only dependency, for the photos sets alone

    rng = np.random.default_rng(PHOTO_SEED)
    parts: dict[str, list] = {"tx": [], "ty": [], "vx": [], "vy": []}
    for label, name in enumerate(PHOTOS):
        photo = Image.fromarray(getattr(skimage.data, name)())
        height = round(photo.height * width / photo.width)
        pixels = np.asarray(photo.resize((width, height), Image.LANCZOS))
        for row in range(height // PHOTO_PATCH):
            for col in range(width // PHOTO_PATCH):
                x, y = ("vx", "vy") if col % 3 == 1 else ("tx", "ty")
                top, left = row * PHOTO_PATCH, col * PHOTO_PATCH
                parts[x].append(pixels[top:top + PHOTO_PATCH, left:left + PHOTO_PATCH])
                parts[y].append(label)
    train, test = rng.permutation(len(parts["ty"])), rng.permutation(len(parts["vy"]))
    return (np.stack(parts["tx"])[train], np.asarray(parts["ty"])[train], np.stack(parts["vx"])[test],
            np.asarray(parts["vy"])[test])


def _png_set(root: Path, images: tuple, layout: str, labels: list[str]) -> None:
    """`folders` (train/<label>/x.png) or `files` (train/ID.png + train.csv of labels) layout; `labels` are
    the classes as the files spell them."""
    tx, ty, vx, _ = images
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for i, (image, y) in enumerate(zip(tx, ty)):
        folder = root / "train" / (labels[y] if layout == "folders" else "")
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
        rows.append((f"{i:05d}", labels[y]))
    ids = [f"t{i:05d}" for i in range(len(vx))]
    for image, image_id in zip(vx, ids):
        Image.fromarray(image).save(root / "test" / f"{image_id}.png")
    if layout == "files":
        pd.DataFrame(rows, columns=["id", "label"]).to_csv(root / "train.csv", index=False)
        pd.DataFrame({"id": ids, "label": labels[0]}).to_csv(root / "sample_submission.csv", index=False)
    else:
        pd.DataFrame({"file": [f"{i}.png" for i in ids], "digit": labels[0]}).to_csv(root / "sample_submission.csv",
                                                                                     index=False)


def _png_spec(root: Path, layout: str, names: list[str]) -> Path:
    """The spec of a 28x28 grey `_png_set`, beside its folder: class numbers shown by `names` (`files`), or
    the folders' names (`folders`)."""
    if layout == "files":
        spec = (f'name = "{root.name}"\nmetric = "accuracy"\n\n[files]\nlayout = "files"\n'
                'train = "train.csv"\nimage_extension = ".png"\n\n[columns]\nid = "id"\nlabel = "label"\n'
                'submission = ["id", "label"]\n\n[image]\nheight = 28\nwidth = 28\nchannels = 1\n\n[classes]\n'
                'num_classes = 10\nnames = [' + ", ".join(f'"{name}"' for name in names) + "]\n")
    else:
        spec = (f'name = "{root.name}"\nmetric = "accuracy"\n\n[files]\nlayout = "folders"\n\n'
                '[columns]\nsubmission = ["file", "digit"]\n\n[image]\nheight = 28\nwidth = 28\nchannels = 1\n')
    path = root.parent / f"{root.name}.toml"
    path.write_text(spec)
    return path


def answers_path(root: Path) -> Path:
    """Where a competition's held-out answers are kept: beside its folder, never inside it."""
    return root.parent / f"{root.name}-solution.csv"


def build(name: str, root: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write competition `name` into root and its answers beside it; return its spec and the raw
    train/test pixels and labels."""
    kind, n = name.rsplit("-", 1)
    n = int(n)
    if kind == "digits":
        spec, *images = _digits_rows(root, n)
        labels = [str(k) for k in range(10)]
    elif kind == "mnist-png":
        from kaggle_vit.data.fetch import load_mnist

        tx, ty, vx, vy = load_mnist()
        images, labels = [tx[:n], ty[:n], vx[:N_TEST], vy[:N_TEST]], MNIST_NAMES
        _png_set(root, images, "folders", labels)
        spec = _png_spec(root, "folders", labels)
    elif kind == "fashion-png":
        images, labels = list(_fashion(n)), [str(k) for k in range(10)]
        _png_set(root, images, "files", labels)
        spec = _png_spec(root, "files", FASHION_NAMES)
    elif kind == "photos":
        images, labels = list(_photo_tiles(n)), PHOTOS
        _png_set(root, images, "files", labels)
        spec = PHOTOS_SPEC
    else:
        raise SystemExit(f"unknown set {name!r}: one of {', '.join(SETS)} (any size)")
    answers = pd.read_csv(root / "sample_submission.csv", dtype=str)
    answers.iloc[:, 1] = [labels[y] for y in images[3]]
    answers.to_csv(answers_path(root), index=False)
    return spec, *images


def baselines(tx: np.ndarray, ty: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> tuple[float, float]:
    """Held-out accuracy of a logistic regression and of a kNN (k by 5-fold CV up to 5,000 rows) on the
    raw pixels / 255."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsClassifier

    a, b = tx.reshape(len(tx), -1) / 255.0, vx.reshape(len(vx), -1) / 255.0
    logreg = LogisticRegression(max_iter=2000).fit(a, ty)
    if len(a) > 5000:  # the grid search costs minutes there; 3 neighbours is MNIST's usual best
        knn = KNeighborsClassifier(n_neighbors=3).fit(a, ty)
    else:
        folds = min(5, int(np.bincount(ty).min()))
        knn = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": [1, 3, 5, 7]}, cv=max(2, folds)).fit(a, ty)
    return float((logreg.predict(b) == vy).mean()), float((knn.predict(b) == vy).mean())


def held_out(submission: Path, answers: Path) -> float:
    """Accuracy of a submission's second column against the held-out answers (the same ids, in order)."""
    predicted, truth = (pd.read_csv(path, dtype=str).iloc[:, 1].to_numpy() for path in (submission, answers))
    return float((predicted == truth).mean())


def build_new(name: str, out: Path) -> tuple[Path, Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build competition `name` under OUT/sets; its folder, spec and raw pixels and labels."""
    data = out / "sets" / name
    if data.exists():
        raise SystemExit(f"{data} exists: give a new OUT_DIR")
    return data, *build(name, data)


def run(name: str, out: Path, extra: list[str]) -> str:
    """One competition: build, cv + submit with the defaults, score; the markdown row."""
    data, spec, tx, ty, vx, vy = build_new(name, out)
    work = out / "work" / name
    work.mkdir(parents=True)
    cli = [sys.executable, "-m", "kaggle_vit.cli"]
    started = time.perf_counter()
    cv = subprocess.run([*cli, "cv", "-c", str(spec), "--data-dir", str(data), "--folds", "5", "--quiet", *extra],
                        cwd=work, capture_output=True, text=True)
    sub = subprocess.run([*cli, "submit", "-c", str(spec), "--data-dir", str(data)], cwd=work,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (work / "cv.log").write_text(cv.stdout + cv.stderr + sub.stdout + sub.stderr)
    if cv.returncode or sub.returncode:
        return f"| {name} | failed (see {work}/cv.log) | | | |"
    score = held_out(work / "submission.csv", answers_path(data))
    logreg, knn = baselines(tx, ty, vx, vy)
    return (f"| {name} | {len(ty):,} | {len(vy):,} | **{100 * score:.2f}%** | {seconds:.0f} s | {100 * logreg:.2f}% | "
            f"{100 * knn:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sets", default=",".join(SETS[:-2]))
    parser.add_argument("--build-only", action="store_true",
                        help="write the competitions and print each one's data folder, spec and answers; train nothing")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if args.build_only:
        for name in args.sets.split(","):
            data, spec, *_ = build_new(name, args.out)
            print(f"{name}: --data-dir {data} -c {spec} --solution {answers_path(data)}", flush=True)
        return
    print("| competition | training rows | held-out rows | kaggle-vit held-out | cv + submit | logistic regression | kNN |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.sets.split(","):
        print(run(name, args.out, extra), flush=True)


if __name__ == "__main__":
    main()
