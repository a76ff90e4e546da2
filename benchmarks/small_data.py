"""Default `cv` + `submit` on small competitions made from real data, beside scikit-learn baselines.

Each competition is written in a real Kaggle layout from real images, with a held-out test set whose
answers are kept apart: digit-recognizer pixel CSVs (the offline build's rows), MNIST digits as PNG files
in class folders, and Fashion-MNIST as PNG files with a labels CSV of class numbers (Debian's
`dataset-fashion-mnist`). kaggle-vit runs with its defaults only (`cv --folds 5`, then `submit`), as a
user would, one competition at a time; a logistic regression and a kNN (k picked by 5-fold CV) are fitted
on the same training pixels and scored on the same held-out rows.

    python benchmarks/small_data.py OUT_DIR [--sets digits-100,mnist-png-200,...] [-- extra cv options]

Prints one markdown row per competition: size, held-out score of kaggle-vit, its wall time, and the
baselines' scores.
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
        "digits-42000")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (_idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "train-labels-idx1-ubyte.gz"),
            _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz"))


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


def _png_set(root: Path, images: tuple, n: int, layout: str, names: list[str]) -> Path:
    """`folders` (train/<class>/x.png) or `files` (train/ID.png + train.csv of class numbers) layout."""
    tx, ty, vx, vy = images
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for i in range(n):
        folder = root / "train" / (names[ty[i]] if layout == "folders" else "")
        folder.mkdir(exist_ok=True)
        Image.fromarray(tx[i]).save(folder / f"{i:05d}.png")
        rows.append((f"{i:05d}", int(ty[i])))
    ids = [f"t{i:05d}" for i in range(N_TEST)]
    for i, image_id in enumerate(ids):
        Image.fromarray(vx[i]).save(root / "test" / f"{image_id}.png")
    if layout == "files":
        pd.DataFrame(rows, columns=["id", "label"]).to_csv(root / "train.csv", index=False)
        pd.DataFrame({"id": ids, "label": 0}).to_csv(root / "sample_submission.csv", index=False)
        spec = (f'name = "fashion-{n}"\nmetric = "accuracy"\n\n[files]\nlayout = "files"\ntrain = "train.csv"\n'
                'image_extension = ".png"\n\n[columns]\nid = "id"\nlabel = "label"\nsubmission = ["id", "label"]\n\n'
                '[image]\nheight = 28\nwidth = 28\nchannels = 1\n\n[classes]\nnum_classes = 10\nnames = ['
                + ", ".join(f'"{name}"' for name in names) + "]\n")
    else:
        files = [f"{image_id}.png" for image_id in ids]
        pd.DataFrame({"file": files, "digit": names[0]}).to_csv(root / "sample_submission.csv", index=False)
        spec = (f'name = "mnist-folders-{n}"\nmetric = "accuracy"\n\n[files]\nlayout = "folders"\n\n'
                '[columns]\nsubmission = ["file", "digit"]\n\n[image]\nheight = 28\nwidth = 28\nchannels = 1\n')
    path = root.parent / f"{root.name}.toml"
    path.write_text(spec)
    return path


def build(name: str, root: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write competition `name` into root; return its spec and the raw train/test pixels and labels."""
    kind, n = name.rsplit("-", 1)
    n = int(n)
    if kind == "digits":
        return _digits_rows(root, n)
    if kind == "mnist-png":
        from kaggle_vit.data.fetch import load_mnist

        images = load_mnist()
        names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        return (_png_set(root, images, n, "folders", names), images[0][:n], images[1][:n], images[2][:N_TEST],
                images[3][:N_TEST])
    images = _fashion()
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return (_png_set(root, images, n, "files", names), images[0][:n], images[1][:n], images[2][:N_TEST],
            images[3][:N_TEST])


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


def held_out(submission: Path, vy: np.ndarray, name: str) -> float:
    """Accuracy of a submission's second column against the true labels (in the held-out order)."""
    frame = pd.read_csv(submission)
    predicted = frame.iloc[:, 1].astype(str).to_numpy()
    if name.startswith("mnist-png"):
        names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        truth = np.asarray([names[y] for y in vy])
    else:
        truth = vy.astype(str)
    return float((predicted == truth).mean())


def run(name: str, out: Path, extra: list[str]) -> str:
    """One competition: build, cv + submit with the defaults, score; the markdown row."""
    data = out / "sets" / name
    spec, tx, ty, vx, vy = build(name, data) if not data.exists() else (None, None, None, None, None)
    if spec is None:
        raise SystemExit(f"{data} exists: give a new OUT_DIR")
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
    score = held_out(work / "submission.csv", vy, name)
    logreg, knn = baselines(tx, ty, vx, vy)
    return (f"| {name} | {len(ty):,} | {len(vy):,} | **{100 * score:.2f}%** | {seconds:.0f} s | {100 * logreg:.2f}% | "
            f"{100 * knn:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sets", default=",".join(SETS[:-1]))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    print("| competition | training rows | held-out rows | kaggle-vit held-out | cv + submit | logistic regression | kNN |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.sets.split(","):
        print(run(name, args.out, extra), flush=True)


if __name__ == "__main__":
    main()
