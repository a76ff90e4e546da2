"""Transfer learning across competitions: a kvit fold checkpoint from `mnist`, fine-tuned on
another spec, against the same model trained from scratch, in validation accuracy per epoch.

    kaggle-vit data mnist --offline && kaggle-vit cv -c mnist --fold 1     # the weights
    python benchmarks/transfer.py runs/mnist/kvit_pico_patch4_28-*/fold1/model.safetensors [key=value ...]

With settings after the weights (`layer_decay=0.75`, `mixup=0.2`), a third run fine-tunes with them.

The other competition is UCI's optical digits (scikit-learn's `load_digits`: 1,797 digits by 43
writers, 8x8 with 17 grey levels), written in digit-recognizer's layout at 28x28 for the spec
`benchmarks/optdigits.toml`. Both runs use the same settings, folds and seeds through `run_cv`
(validation only); the printed accuracy of an epoch is the mean over the 5 folds' validation rows.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kaggle_vit.config import apply_overrides, parse_set
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.run.cv import run_cv
from kaggle_vit.run.settings import resolve_config
from kaggle_vit.spec import load_spec
from kaggle_vit.train.schedule import fold_rows, plan_schedule

SPEC = Path(__file__).with_name("optdigits.toml")
N_TEST = 297  # the rest (1,500) is the training set the folds split


def build_optdigits(dest: Path) -> Path:
    """scikit-learn's 8x8 digits as 28x28 uint8 pixel CSVs (bilinear upscaling), digit-recognizer's layout."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
                       for im in digits.images]).reshape(len(digits.images), -1)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:N_TEST], order[N_TEST:]
    columns = [f"pixel{i}" for i in range(28 * 28)]
    dest.mkdir(parents=True, exist_ok=True)
    pd.concat([pd.DataFrame({"label": digits.target[train]}), pd.DataFrame(images[train], columns=columns)], axis=1
              ).to_csv(dest / "train.csv", index=False)
    pd.DataFrame(images[test], columns=columns).to_csv(dest / "test.csv", index=False)
    ids = np.arange(1, N_TEST + 1)
    pd.DataFrame({"ImageId": ids, "Label": 0}).to_csv(dest / "sample_submission.csv", index=False)
    pd.DataFrame({"ImageId": ids, "Label": digits.target[test]}).to_csv(dest / "solution.csv", index=False)
    return dest


def accuracy_per_epoch(run_dir: Path, folds: int) -> np.ndarray:
    """Each epoch's validation accuracy over all folds' validation rows (folds weighted by size)."""
    histories = [pd.read_csv(run_dir / f"fold{k}" / "history.csv") for k in range(1, folds + 1)]
    sizes = np.array([len(np.load(run_dir / f"fold{k}" / "valid_probs.npz", allow_pickle=False)["rows"])
                      for k in range(1, folds + 1)])
    accs = np.stack([h["valid_acc"].to_numpy() for h in histories])
    return (accs * sizes[:, None]).sum(0) / sizes.sum()


def main(weights: Path, extra: dict, out: Path = Path("runs/transfer")) -> None:
    """Train the optdigits folds from scratch, from `weights`, and (given `extra` settings) from
    `weights` with them; print accuracy per epoch for each."""
    data = load_competition(load_spec(SPEC), build_optdigits(out / "data"))
    tuned = resolve_config(competition=str(SPEC), pretrained=str(weights), jobs=1)
    tuned, _ = plan_schedule(tuned, fold_rows(len(data.train), tuned.folds))  # the epochs printed below
    scratch = dataclasses.replace(tuned, pretrained=None)
    curves, seconds = {}, {}
    runs = [("from scratch", scratch), ("fine-tuned from mnist", tuned)]
    if extra:
        shown = " ".join(f"{k}={v}" for k, v in extra.items())
        runs.append((f"fine-tuned with {shown}", apply_overrides(tuned, extra, "benchmarks/transfer.py")))
    for name, cfg in runs:
        t0 = time.perf_counter()
        folder = out / name.replace(" ", "-").replace("=", "")
        run_cv(cfg, data, folder, validate_only=True)
        seconds[name] = time.perf_counter() - t0
        curves[name] = accuracy_per_epoch(folder, cfg.folds)
    print(f"{tuned.model}, {tuned.folds} folds of {len(data.train)} optdigits rows, {tuned.epochs} epochs, lr {tuned.lr}")
    print("epoch | " + " | ".join(curves))
    for epoch in range(tuned.epochs):
        print(f"{epoch + 1} | " + " | ".join(f"{100 * c[epoch]:.2f}%" for c in curves.values()))
    print("seconds | " + " | ".join(f"{s:.0f}" for s in seconds.values()))


if __name__ == "__main__":
    main(Path(sys.argv[1]), parse_set(sys.argv[2:]))
