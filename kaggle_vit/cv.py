"""Stratified k-fold cross-validation: folds → engine.fit → run directory with OOF and test probabilities.

A fold is finished when its `result.json` exists (written last) and its other files read back;
a fold with only `state.pt` resumes from its last completed epoch. Every file is written
atomically, so a kill at any moment loses at most the epoch in progress; a damaged file costs at
most its fold, which is trained again (an unreadable `state.pt` restarts the fold).
"""
from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .competition import CompetitionSpec
from .config import TrainConfig, load_toml, save_config, to_toml
from .data import CompetitionData, load_or_make_folds, save_folds
from .dataset import ImageDataset, resolve_data_config
from .engine import (NoProgress, Progress, fit, inference_amp, maybe_compile, predict_probs, read_state,
                     seed_everything, select_device)
from .errors import Interrupted, KaggleVitError
from .io import atomic_path, read_json, write_json
from .models import build, model_kwargs
from .notices import notice
from .report import plot_curves
from .rundir import RunDir, fold_problem, shared_folds
from .workers import auto_jobs, train_folds_parallel


@dataclass(frozen=True)
class CVResult:
    """Per-fold summaries and, when every fold is done, the out-of-fold scores."""

    run_dir: Path
    folds: list[dict]
    n_folds: int
    oof_acc: float | None
    oof_loss: float | None
    trained: list[int]
    oof_acc_plain: float | None = None  # without test-time views

    @property
    def complete(self) -> bool:
        return self.oof_acc is not None


def default_run_dir(cfg: TrainConfig, spec: CompetitionSpec, runs_root: Path = Path("runs")) -> Path:
    """runs/COMPETITION/MODEL-HASH: the same settings land in the same folder, so a rerun resumes."""
    return runs_root / spec.name / f"{cfg.model}-{cfg.fingerprint()}"


def git_hash() -> str:
    """The package's git commit, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig, spec: CompetitionSpec) -> None:
    """Record the resolved config; refuse a folder that holds a run with different settings."""
    config_path = RunDir(run_dir).config
    if config_path.exists():
        saved = load_toml(config_path)
        differing = [k for k, v in cfg.result_settings().items() if saved.get(k) != v]
        if differing:
            raise KaggleVitError(f"{config_path}: this run was made with other settings ({', '.join(differing)}); "
                                 f"choose another --run-dir")
        return
    header = f"kaggle-vit {__version__} (git {git_hash()}), competition spec {spec.path}"
    save_config(cfg, config_path, header)


def _check_writable(run_dir: Path) -> None:
    """Fail with one line, before any work, when the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise KaggleVitError(f"{run_dir}: cannot write to the run folder ({error.strerror}); "
                             f"choose another --run-dir") from None


def _finished(run_dir: Path, fold: int) -> bool:
    """Whether a fold is done: result.json written and every file of it readable. A fold with a
    damaged or missing file is marked unfinished (its result.json removed) so it trains again."""
    result = RunDir(run_dir).fold(fold).result
    if not result.exists():
        return False
    problem = fold_problem(run_dir, fold)
    if problem:
        notice(f"fold {fold}: {problem}; training the fold again")
        result.unlink()
        return False
    return True


def _resume_state(path: Path, fold: int, epochs: int) -> dict | None:
    """A fold's saved training state, saying that it resumes; an unreadable one restarts the fold."""
    if not path.exists():
        return None
    try:
        state = read_state(path)
    except Exception as error:  # noqa: BLE001 - a damaged state file costs the fold's epochs, not the run
        notice(f"fold {fold}: {path} is unreadable ({type(error).__name__}); restarting the fold from its first epoch")
        return None
    notice(f"fold {fold}: resuming after epoch {state['state']['epoch']} of {epochs}")
    return state


class _Tracked:
    """The user's Progress, remembering which fold and epoch are training (for Ctrl-C's message)."""

    def __init__(self, progress: Progress):
        self.progress, self.fold = progress, 0
        self.running: dict[int, tuple[int, int]] = {}

    def start_fold(self, fold: int, folds: int) -> None:
        self.fold, self.running[fold] = fold, (0, 0)
        self.progress.start_fold(fold, folds)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.running[self.fold] = (epoch, epochs)
        self.progress.start_epoch(epoch, epochs, steps)

    def step(self, loss: float, images: int) -> None:
        self.progress.step(loss, images)

    def end_epoch(self, record: dict) -> None:
        self.progress.end_epoch(record)

    def end_fold(self, summary: dict) -> None:
        self.running.pop(summary["fold"], None)
        self.progress.end_fold(summary)


def train_fold(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, fold: int, run_dir: Path,
               progress: Progress, on_epoch=None) -> dict:
    """Train one fold and write its checkpoint, history, validation and test probabilities."""
    spec, out = data.spec, RunDir(run_dir).fold(fold)
    out.root.mkdir(parents=True, exist_ok=True)
    state_path = out.state
    tr, va = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    images, labels = data.train.images, data.train.labels
    kwargs = model_kwargs(cfg, spec)
    seed_everything(cfg.seed + fold)  # the fold's initial weights do not depend on what ran before
    model = build(cfg.model, kwargs)
    data_config = resolve_data_config(model)  # size, mean and std the model wants (kvit: [-1, 1])
    progress.start_fold(fold, cfg.folds)
    try:
        result = fit(model, ImageDataset(images[tr], labels[tr], data_config=data_config),
                     ImageDataset(images[va], labels[va], data_config=data_config), cfg, seed=cfg.seed + fold,
                     state_path=state_path, resume=_resume_state(state_path, fold, cfg.epochs), progress=progress,
                     on_epoch=on_epoch)
    except KaggleVitError as error:
        raise KaggleVitError(f"fold {fold}: {error}") from None
    checkpoint = {"model": cfg.model, "kwargs": kwargs, "state_dict": result.best_state, "fold": fold,
                  "competition": spec.name, "input_size": (spec.channels, spec.height, spec.width),
                  "num_classes": spec.num_classes, "class_names": list(spec.class_names), "valid_acc": result.history[result.best_epoch - 1]["valid_acc"]}
    with atomic_path(out.model) as tmp:
        torch.save(checkpoint, tmp)
    device = select_device(cfg.device)
    model.load_state_dict(result.best_state)
    predictor, amp = maybe_compile(model, cfg), inference_amp(cfg.amp, device)
    t0 = time.perf_counter()
    valid_probs = predict_probs(predictor, ImageDataset(images[va], data_config=data_config), device, amp,
                                cfg.eval_batch_size, cfg.tta, cfg.compile, cfg.tta_mode)
    test_probs = predict_probs(predictor, ImageDataset(data.test.images, data_config=data_config), device, amp,
                               cfg.eval_batch_size, cfg.tta, cfg.compile, cfg.tta_mode)
    with atomic_path(out.test_probs) as tmp, open(tmp, "wb") as fh:
        np.save(fh, test_probs)
    with atomic_path(out.valid_probs) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, rows=va, probs=valid_probs, probs_plain=result.valid_probs.astype(np.float32))
    history = pd.DataFrame(result.history)
    with atomic_path(out.history) as tmp:
        history.to_csv(tmp, index=False)
    best = result.history[result.best_epoch - 1]
    summary = {"fold": fold, "best_epoch": result.best_epoch,
               "valid_acc": float((valid_probs.argmax(1) == labels[va]).mean()), "tta": cfg.tta,
               "valid_acc_plain": best["valid_acc"], "valid_loss": best["valid_loss"],
               "train_seconds": result.train_seconds, "predict_seconds": time.perf_counter() - t0,
               "images_per_s": float(np.median([r["images_per_s"] for r in result.history])),
               "amp": result.amp, "device": str(device), "epochs": len(result.history)}
    write_json(out.result, summary)
    state_path.unlink(missing_ok=True)
    progress.end_fold(summary)
    return summary


def _write_oof(run_dir: Path, data: CompetitionData, folds: np.ndarray, n_folds: int) -> dict[str, float]:
    """Gather every fold's validation probabilities into oof.csv; return OOF accuracy and loss (of
    the run's predictor, with its test-time views) and the accuracy without test-time views."""
    labels, n_classes = data.train.labels, data.spec.num_classes
    probs = np.zeros((len(labels), n_classes), dtype=np.float32)
    plain = np.zeros(len(labels), dtype=np.int64)
    for fold in range(1, n_folds + 1):
        with np.load(RunDir(run_dir).fold(fold).valid_probs) as z:
            probs[z["rows"]] = z["probs"]
            plain[z["rows"]] = (z["probs_plain"] if "probs_plain" in z else z["probs"]).argmax(1)
    pred = probs.argmax(1)
    frame = pd.DataFrame({"row": np.arange(len(labels)), "label": labels, "fold": folds, "pred": pred})
    frame = pd.concat([frame, pd.DataFrame(probs, columns=[f"prob_{c}" for c in range(n_classes)])], axis=1)
    with atomic_path(RunDir(run_dir).oof) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"oof_acc": float((pred == labels).mean()), "oof_loss": loss, "oof_acc_plain": float((plain == labels).mean())}


def run_cv(cfg: TrainConfig, data: CompetitionData, run_dir: Path, only_folds: list[int] | None = None,
           progress: Progress | None = None, on_epoch=None, runs_root: Path | None = None) -> CVResult:
    """Train every fold not yet finished (or only `only_folds`), then write OOF scores and curves.
    Folds train `cfg.jobs` at a time in worker processes (`workers`), or in this process when one
    at a time or when `on_epoch` (tune's pruning hook) must see every epoch."""
    progress = _Tracked(progress or NoProgress())
    spec = data.spec
    build(cfg.model, model_kwargs(cfg, spec))  # an impossible model fails here, before any folder or worker
    wanted = only_folds or list(range(1, cfg.folds + 1))
    bad = [k for k in wanted if not 1 <= k <= cfg.folds]
    if bad:
        raise KaggleVitError(f"--fold {bad[0]}: folds are numbered 1..{cfg.folds}")
    _check_writable(run_dir)
    _prepare_run_dir(run_dir, cfg, spec)
    run = RunDir(run_dir)
    shared = shared_folds(runs_root or run_dir.parent, cfg.folds, cfg.seed)
    folds = load_or_make_folds(shared, data.train.labels, cfg.folds, cfg.seed)
    if not run.folds.exists():
        save_folds(run.folds, folds, data.train.labels)
    trained = [k for k in wanted if not _finished(run_dir, k)]
    jobs = 1 if on_epoch is not None else auto_jobs(cfg, select_device(cfg.device), len(trained))
    try:
        if jobs > 1:
            train_folds_parallel(cfg, data, folds, trained, run_dir, jobs, progress)
        else:
            for fold in trained:
                train_fold(cfg, data, folds, fold, run_dir, progress, on_epoch)
    except KeyboardInterrupt:
        raise Interrupted.during(progress.running) from None
    summaries = [read_json(run.fold(k).result) for k in range(1, cfg.folds + 1) if run.fold(k).result.exists()]
    oof = {"oof_acc": None, "oof_loss": None, "oof_acc_plain": None}
    if len(summaries) == cfg.folds:
        oof = _write_oof(run_dir, data, folds, cfg.folds)
    histories = {s["fold"]: pd.read_csv(run.fold(s["fold"]).history).to_dict("records") for s in summaries}
    if histories:
        plot_curves(histories, run.plot("curves"))
    metrics = {"competition": spec.name, "model": cfg.model, "class_names": list(spec.class_names),
               "folds": summaries, "n_folds": cfg.folds,
               **oof, "tta": cfg.tta,
               "train_seconds": sum(s["train_seconds"] for s in summaries),
               "predict_seconds": sum(s.get("predict_seconds", 0.0) for s in summaries),
               "version": __version__, "git": git_hash(), "config": to_toml(cfg)}
    write_json(run.metrics, metrics)
    return CVResult(run_dir, summaries, cfg.folds, oof["oof_acc"], oof["oof_loss"], trained, oof["oof_acc_plain"])
