"""One-fold accuracy-per-minute probe behind README's recipe table.

    python benchmarks/fold1.py '{"epochs": 6, "stem_channels": 32, "depth": 2}'

Trains the given settings (TrainConfig fields, over the defaults) on fold 1 of the saved 5-fold
split of digit-recognizer through the same `fit` as `kaggle-vit cv`, and prints each epoch's
validation accuracy, the best epoch's accuracy with the run's test-time views, the training wall
time and, when the data folder has the offline build's `solution.csv`, the fold model's accuracy
on the 28,000 held-out rows with 3 views (less noisy than 8,400 validation rows). Fold 1 is seeded
as `kaggle-vit cv` seeds it, so the same settings train the same model as `kaggle-vit cv --fold 1`.
`"subset": N` trains on the first N training rows only.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from kaggle_vit.config import TrainConfig, apply_overrides, validate_config
from kaggle_vit.data.folds import load_or_make_folds
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.models.factory import create_model
from kaggle_vit.run.rundir import shared_folds
from kaggle_vit.spec import load_spec
from kaggle_vit.submit import read_solution
from kaggle_vit.train.dataset import ImageDataset, resolve_data_config
from kaggle_vit.train.device import inference_amp, select_device
from kaggle_vit.train.engine import fit, predict_probs, seed_everything


def main(overrides: dict, data_dir: Path = Path("data/digit-recognizer"), runs: Path = Path("runs/digit-recognizer")) -> None:
    """Train fold 1 with `overrides` and print per-epoch validation accuracy, wall time, images/s."""
    subset = overrides.pop("subset", None)
    cfg = apply_overrides(TrainConfig(), overrides, "benchmarks/fold1.py")
    validate_config(cfg)
    spec = load_spec(cfg.competition)
    data = load_competition(spec, data_dir)
    runs.mkdir(parents=True, exist_ok=True)
    folds = load_or_make_folds(shared_folds(runs, cfg.folds, cfg.seed), data.train.labels, cfg.folds, cfg.seed)
    tr, va = np.flatnonzero(folds != 1), np.flatnonzero(folds == 1)
    tr = tr[:subset] if subset else tr
    seed_everything(cfg.seed + 1)  # as `kaggle-vit cv` seeds fold 1 before building its model
    model = create_model(cfg, spec)
    t0 = time.perf_counter()
    data_config = resolve_data_config(model)
    images = data.train.images  # the cache; the datasets hold rows of it, as a fold does
    result = fit(model, ImageDataset(images, data.train.labels[tr], data_config=data_config, rows=tr),
                 ImageDataset(images, data.train.labels[va], data_config=data_config, rows=va), cfg, seed=cfg.seed + 1)
    train_s = time.perf_counter() - t0
    model.load_state_dict(result.best_state)
    device = select_device(cfg.device)
    valid = ImageDataset(images, data_config=data_config, rows=va)
    views = {}
    for n in sorted({3, cfg.tta} - {1}):
        probs = predict_probs(model, valid, device, inference_amp(cfg.amp, device), cfg.eval_batch_size, n, mode=cfg.tta_mode)
        views[n] = (probs.argmax(1) == data.train.labels[va]).mean() * 100
    solution = data_dir / spec.solution_file
    if solution.exists():
        _, truth = read_solution(solution, data.spec)
        probs = predict_probs(model, ImageDataset(data.test.images, data_config=data_config), device,
                              inference_amp(cfg.amp, device), cfg.eval_batch_size, 3, mode=cfg.tta_mode)
        views["held-out"] = (probs.argmax(1) == truth).mean() * 100
    accs = " ".join(f"{h.valid_acc * 100:.2f}" for h in result.history)
    rate = np.median([h.images_per_s for h in result.history])
    with_views = ", ".join(f"{acc:.3f}% on the held-out rows with 3 views" if n == "held-out" else f"{acc:.2f}% with {n} views"
                           for n, acc in views.items())
    print(f"{cfg.model} {json.dumps(overrides)}: valid % per epoch [{accs}], {with_views}; "
          f"{train_s:.1f} s training, {rate:.0f} train images/s")


if __name__ == "__main__":
    main(json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
