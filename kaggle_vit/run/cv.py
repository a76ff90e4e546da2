"""Stratified k-fold cross-validation: folds → engine.fit → run directory with OOF and test probabilities.

A fold is finished when its `result.json` exists (written last) and its other files read back;
a fold with only `state.pt` resumes from its last completed epoch. Every file is written
atomically, so a kill at any moment loses at most the epoch in progress; a damaged file costs at
most its fold, which is trained again (an unreadable `state.pt` restarts the fold). The schedule
is planned from the training rows (`schedule`), or fitted to a time budget, before the first step,
and kept in `plan.json`: a resumed run trains to the plan it started with. Several processes, on
one machine or many, may share a run folder: the files they share are written under its lock, and
each fold is trained by the process that claimed it (`claims`; docs/distributed.md).
"""
from __future__ import annotations

import dataclasses
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .. import __version__
from ..config import TrainConfig, load_toml, save_config, to_toml
from ..data.folds import save_folds, split_folds
from ..data.layouts import CompetitionData
from ..errors import Interrupted, KaggleVitError
from ..io import atomic_path
from ..metrics import get_metric
from ..notices import notice
from ..records import EpochRecord, FoldResult, RunMetrics, SeedEnsemble
from ..spec import CompetitionSpec
from ..train import ddp
from ..train.device import auto_jobs, visible_devices
from ..train.engine import NoProgress, Progress
from ..train.schedule import Plan, budget_plan, fold_rows, plan_schedule, read_plan, write_plan
from .claims import FoldClaims, finished
from .fold import fold_teacher, train_fold
from .jobs import train_folds_parallel
from .rundir import RunDir, shared_folds
from .sources import check_source


@dataclass(frozen=True)
class CVResult:
    """A cv call's outcome: the run's metrics as metrics.json holds them (its finished folds' results
    and, when every fold is done, the out-of-fold scores), the folds this call trained, the schedule
    they trained to (`plan`, with its time budget when one was given) and the wall time the call took."""

    run_dir: Path
    metrics: RunMetrics
    trained: list[int]
    plan: Plan | None = None
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.metrics.complete


def default_run_dir(cfg: TrainConfig, spec: CompetitionSpec, runs_root: Path = Path("runs")) -> Path:
    """runs/COMPETITION/MODEL-HASH: the same settings land in the same folder, so a rerun resumes.
    `cfg` is planned (`schedule.plan_schedule`): with a time budget, its epochs are still unset, so
    the folder is named by the budget, not by the throughput measured."""
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

    def step(self, loss: float | None, images: int) -> None:
        self.progress.step(loss, images)

    def end_epoch(self, record: EpochRecord) -> None:
        self.progress.end_epoch(record)

    def end_fold(self, summary: FoldResult) -> None:
        self.running.pop(summary.fold, None)
        self.progress.end_fold(summary)


def oof_probs(run_dir: Path, n_rows: int, n_classes: int, n_folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Every fold's validation probabilities put back in row order: plain, and with the run's
    test-time views."""
    probs = np.zeros((n_rows, n_classes), dtype=np.float32)
    probs_views = np.zeros_like(probs)
    rows, _, plain, views = RunDir(run_dir).read_oof(range(1, n_folds + 1))
    probs[rows], probs_views[rows] = plain, views
    return probs, probs_views


OOF_SCORES = ("oof_acc", "oof_acc_views", "oof_score", "oof_score_views", "oof_loss_views")


def _write_oof(run_dir: Path, data: CompetitionData, folds: np.ndarray, n_folds: int) -> dict[str, float]:
    """Gather every fold's validation probabilities into oof.csv (the run's predictor: with its
    test-time views); return the OOF_SCORES: accuracy and the competition's metric, plain and with
    the views, and the loss with the views."""
    labels, n_classes, metric = data.train.labels, data.spec.num_classes, get_metric(data.spec.metric)
    probs, probs_views = oof_probs(run_dir, len(labels), n_classes, n_folds)
    pred = probs_views.argmax(1)
    frame = pd.DataFrame({"row": np.arange(len(labels)), "label": labels, "fold": folds, "pred": pred})
    frame = pd.concat([frame, pd.DataFrame(probs_views, columns=[f"prob_{c}" for c in range(n_classes)])], axis=1)
    with atomic_path(RunDir(run_dir).oof) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    loss = float(-np.log(np.clip(probs_views[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"oof_acc": float((probs.argmax(1) == labels).mean()), "oof_acc_views": float((pred == labels).mean()),
            "oof_score": metric(labels, probs), "oof_score_views": metric(labels, probs_views), "oof_loss_views": loss}


def _plan(cfg: TrainConfig, plan: Plan, data: CompetitionData, folds: np.ndarray, run: RunDir, wanted: list[int],
          started: float) -> Plan:
    """The run's plan: with a time budget, the one it made when it started (plan.json), else one
    fitted now to the budget by measuring (with the teacher of the first fold wanted, whose forward
    passes each step pays); without one, `plan` (the settings decide it)."""
    if not cfg.time_budget:
        return plan
    if run.plan.exists():
        return read_plan(run.plan)
    teacher = (lambda student: fold_teacher(cfg, wanted[0], data, student)) if cfg.teacher else None
    return budget_plan(cfg, plan, data, folds, cfg.folds, started, teacher)


def run_cv(cfg: TrainConfig, data: CompetitionData, run_dir: Path, only_folds: list[int] | None = None,
           progress: Progress | None = None, on_epoch=None, runs_root: Path | None = None,
           validate_only: bool = False, started: float | None = None,
           on_plan: Callable[[Plan], None] | None = None) -> CVResult:
    """Train every fold not yet finished (or only `only_folds`) that no other process sharing the
    run folder trains (`claims.FoldClaims`), then write OOF scores and metrics. Folds train as many
    at a time as `device.auto_jobs` picks, in a process pool (`jobs`), or in this process when one
    at a time or when `on_epoch` (tune's pruning hook) must see every epoch. `validate_only` (a
    tuning trial) skips the test predictions and test-time views. The schedule's unset settings are
    planned first, and the plan handed to `on_plan` before the first step (the CLI prints it); a
    time budget counts from `started` (time.monotonic(); default: now). Its model was checked when
    `cfg` was resolved (`settings.resolve_config`); one that cannot be built fails when its first
    fold starts."""
    started = time.monotonic() if started is None else started
    progress = _Tracked(progress or NoProgress())
    spec = data.spec
    cfg, plan = plan_schedule(cfg, fold_rows(len(data.train), cfg.folds))
    wanted = only_folds or list(range(1, cfg.folds + 1))
    bad = [k for k in wanted if not 1 <= k <= cfg.folds]
    if bad:
        raise KaggleVitError(f"--fold {bad[0]}: folds are numbered 1..{cfg.folds}")
    shared = shared_folds(run_dir, spec.name, cfg.folds, cfg.seed, runs_root)
    folds, new_split = split_folds(shared, data.train.labels, cfg.folds, cfg.seed)  # saved once the checks pass
    if cfg.pseudo:
        check_source(Path(cfg.pseudo), folds, wanted, len(data.test.images))
    if cfg.teacher:
        check_source(Path(cfg.teacher), folds, wanted, len(data.test.images), key="teacher", spec=spec)
    run = RunDir(run_dir)
    if on_epoch is not None and ddp.active():
        raise KaggleVitError("tune under torchrun: tune trials one process each; run tune without torchrun or --nproc")
    plan, todo = ddp.from_main(_start_run(cfg, plan, data, folds, new_split, shared, run, wanted, started)
                               if ddp.is_main() else None)  # rank 0 alone writes; every rank trains to its plan
    for k in only_folds or []:
        if k not in todo:
            notice(f"fold {k}: already finished; skipped")
    cfg = plan.fill(cfg)
    if on_plan is not None:
        on_plan(plan)
    devices = visible_devices(cfg)
    jobs = 1 if on_epoch is not None or ddp.active() else auto_jobs(cfg, devices, len(todo), spec.height * spec.width)
    try:
        with _claims(run) as claims:  # each fold claimed before it trains: another process may share the folder
            if jobs > 1:
                train_folds_parallel(cfg, data, folds, todo, run_dir, jobs, progress, devices, claims)
            else:
                one = cfg if devices == ["cpu"] or ddp.active() else dataclasses.replace(cfg, device=devices[0])
                for fold in todo:
                    if ddp.from_main(claims.take(fold)):
                        train_fold(one, data, folds, fold, run_dir, progress, on_epoch, validate_only)
                        claims.release(fold)
    except KeyboardInterrupt:
        raise Interrupted.during(progress.running) from None
    metrics, trained = ddp.from_main((_write_metrics(cfg, data, folds, run), claims.taken) if ddp.is_main() else None)
    return CVResult(run_dir, metrics, trained, plan, time.monotonic() - started)


def _start_run(cfg: TrainConfig, plan: Plan, data: CompetitionData, folds: np.ndarray, new_split: bool, shared: Path,
               run: RunDir, wanted: list[int], started: float) -> tuple[Plan, list[int]]:
    """Write what the processes sharing the run folder share, once (docs/distributed.md), and return
    the run's plan and the folds of `wanted` not yet finished."""
    plan = _plan(cfg, plan, data, folds, run, wanted, started)  # a budget too small: said before any write
    _check_writable(run.root)
    with run.locked():  # processes sharing the folder (docs/distributed.md): the first writes what they share
        _prepare_run_dir(run.root, cfg, data.spec)  # the settings as given: a time budget's epochs are in plan.json
        if new_split:
            save_folds(shared, folds, data.train.labels)
        if not run.folds.exists():
            save_folds(run.folds, folds, data.train.labels)
        if not run.plan.exists():
            write_plan(run.plan, plan)
        plan = _plan(cfg, plan, data, folds, run, wanted, started)  # a budget's: the one written first
        return plan, [k for k in wanted if not finished(run.root, k)]


def _write_metrics(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, run: RunDir) -> RunMetrics:
    """metrics.json of every fold finished so far, by this process or another sharing the folder; the
    last to finish a fold writes the OOF."""
    spec = data.spec
    with run.locked():
        summaries = tuple(run.fold(k).read_result() for k in range(1, cfg.folds + 1) if run.fold(k).result.exists())
        oof = dict.fromkeys(OOF_SCORES)
        if len(summaries) == cfg.folds:
            oof = _write_oof(run.root, data, folds, cfg.folds)
        metrics = RunMetrics(competition=spec.name, model=cfg.model, class_names=tuple(spec.class_names),
                             metric=spec.metric, n_folds=cfg.folds, folds=summaries, tta=cfg.tta, **oof,
                             train_seconds=sum(s.train_seconds for s in summaries),
                             predict_seconds=sum(s.predict_seconds for s in summaries),
                             version=__version__, git=git_hash(), config=to_toml(cfg))
        run.write_metrics(metrics)
    return metrics


def check_data_parallel(cfg: TrainConfig, seeds: int, nproc: int) -> None:
    """Refuse, in one line and before any process starts, what data-parallel training (`cv --nproc`,
    torchrun) does not do. `cfg` is planned (`schedule.plan_schedule`)."""
    if cfg.time_budget:
        raise KaggleVitError("--time-budget with --nproc or torchrun: the budget is measured in one process; "
                             "give --epochs instead")
    if seeds != 1:
        raise KaggleVitError("--seeds with --nproc or torchrun: start one per seed (--set seed=N)")
    if cfg.batch_size is not None and cfg.batch_size < nproc:
        raise KaggleVitError(f"batch_size {cfg.batch_size} is smaller than the {nproc} processes sharing each batch; "
                             f"give a larger batch_size")


class _RankClaims:
    """What a rank other than 0 holds instead of the fold claims: rank 0 claims for all ranks."""

    def __enter__(self) -> _RankClaims:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def take(self, fold: int) -> None:
        return None  # rank 0's answer decides (`ddp.from_main`)

    def release(self, fold: int) -> None:
        return None


def _claims(run: RunDir) -> FoldClaims | _RankClaims:
    """The fold claims of this process: rank 0's (or the only process's) are real."""
    return FoldClaims(run) if ddp.is_main() else _RankClaims()


@dataclass(frozen=True)
class SeedsResult:
    """The runs of `cv --seeds` and, when all are complete, their ensemble's OOF scores."""

    runs: list[CVResult]
    ensemble: SeedEnsemble | None
    metric: str


def run_cv_seeds(cfg: TrainConfig, data: CompetitionData, seeds: int, only_folds: list[int] | None = None,
                 progress: Progress | None = None, on_plan: Callable[[Plan], None] | None = None) -> SeedsResult:
    """CV once per seed (cfg.seed, cfg.seed + 1, ...), each run in the folder `seed = S` gives it,
    then the seed ensemble's OOF scores: the mean of the runs' OOF probabilities, each row still
    predicted only by models that never trained on it. Each run's metrics.json then lists the
    group (`seed_ensemble`), so `submit` without a run folder averages every fold model of every seed."""
    if seeds < 1:
        raise KaggleVitError(f"--seeds must be at least 1, got {seeds}")
    for key in ("pseudo", "teacher"):
        if getattr(cfg, key) and seeds > 1:
            raise KaggleVitError(f"{key} with --seeds: fold K learns from the source run's fold K, and each seed "
                                 f"draws other folds; run one seed per source run")
    if cfg.time_budget and seeds > 1:
        raise KaggleVitError("--time-budget with --seeds: a budget is one run's; run one seed per budget")
    cfg, _ = plan_schedule(cfg, fold_rows(len(data.train), cfg.folds))  # before the runs' folders are named
    results = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        one = dataclasses.replace(cfg, seed=seed)
        results.append(run_cv(one, data, default_run_dir(one, data.spec), only_folds, progress, on_plan=on_plan))
    if not all(r.complete for r in results):
        return SeedsResult(results, None, data.spec.metric)
    labels, metric = data.train.labels, get_metric(data.spec.metric)
    probs = np.mean([oof_probs(r.run_dir, len(labels), data.spec.num_classes, r.metrics.n_folds)[1] for r in results],
                    axis=0)
    ensemble = SeedEnsemble(runs=tuple(str(r.run_dir) for r in results),
                            oof_acc_views=float((probs.argmax(1) == labels).mean()),
                            oof_score_views=metric(labels, probs))
    for r in results:  # the last seed's file is written last, so it is the competition's latest run
        RunDir(r.run_dir).write_metrics(dataclasses.replace(r.metrics, seed_ensemble=ensemble))
    return SeedsResult(results, ensemble, data.spec.metric)
