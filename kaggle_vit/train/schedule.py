"""The training schedule in the data's terms, and `--time-budget`.

A preset's schedule is a budget (`config.BUDGETS`): the images one fold trains on over its
schedule, and the batch size, learning rate and warm-up it was tuned at. `plan_schedule` turns it
into settings for folds of `rows` training rows: the batch is halved until an epoch has enough
steps, the learning rate follows the batch by the square root of its ratio, the epochs spend the
budget's images, and the warm-up grows with the epochs. What the user gave is kept.

With a time budget the epochs are fitted instead: `measure` times the first steps of the real
model on the real data, and `fit_epochs` finds the most epochs whose folds, with their
validations and predictions, fit into what is left of it. The plan is saved in the run folder
(plan.json), so a resumed run trains to the plan it was given, not to a new measurement.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import BUDGETS, DEFAULT_MODEL, SMALL_DATA_MODEL, SMALL_ROWS, Budget, TrainConfig, validate_config
from ..data.layouts import CompetitionData
from ..errors import KaggleVitError
from ..io import read_json, write_json
from ..models.factory import MODEL_SETTINGS, create_model
from .batches import batches_per_epoch, easy_share, skips_rows, train_batches
from .dataset import DataConfig, ImageDataset, resolve_data_config
from .distill import Teacher
from .device import auto_jobs, inference_amp, select_device, visible_devices
from .engine import NoProgress, make_trainer, predict_probs, seed_everything, train_one_epoch, validates

# A fold's teacher for a student that reads its input as the DataConfig says (None: no teacher).
TeacherFor = Callable[[DataConfig], "Teacher | None"]

# The rules, in one table.
MIN_STEPS_PER_EPOCH = 16  # the batch is halved while an epoch would have fewer steps than this ...
MIN_BATCH = 8  # ... but never below this
MIN_EPOCHS, MAX_EPOCHS = 1, 300  # the epochs a budget of images (or of time) may give
WARMUP_SHARE = 0.03  # the warm-up lasts at least this share of the epochs (and the budget's warm-up)
BUDGET_SHARE = 0.9  # of a time budget's seconds left after the probe, the share the plan fills; the rest is for
# what the estimate leaves out (fold workers starting, files written, the machine's noise)
PROBE_WARMUP_STEPS = 3  # untimed first training steps of the probe (allocation, compilation)
PROBE_STEPS = 20  # timed training steps
PROBE_PREDICT_BATCHES = 4  # timed prediction batches (after one untimed)

DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", re.IGNORECASE)
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds of a duration as a user writes it: 90s, 10m, 1.5h (a bare number is seconds)."""
    match = DURATION.fullmatch(text)
    if not match:
        raise KaggleVitError(f"--time-budget '{text}': give a duration such as 90s, 10m or 1.5h (0: off)")
    return float(match[1]) * UNIT_SECONDS[match[2].lower()]


def format_duration(seconds: float) -> str:
    """A duration as `parse_duration` reads it back: 95s, 10m, 1.5h."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.3g}m"
    return f"{seconds / 3600:.3g}h"


def _sci(value: float) -> str:
    """A learning rate as people write it: 4e-3, 2.83e-3."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def fold_rows(n_rows: int, n_folds: int) -> int:
    """The training rows of a fold of `n_rows` split `n_folds` ways (their mean over the folds)."""
    return max(1, round(n_rows * (n_folds - 1) / n_folds))


@dataclass(frozen=True)
class Plan:
    """One fold's schedule, planned or given: `epochs` over `rows` training rows in batches of
    `batch_size`, the peak learning rate and the warm-up in epochs; with a time budget, the
    throughput it was fitted to and the run's estimated seconds. `epochs` and `warmup_epochs` are
    None while a time budget is still to be measured."""

    rows: int
    epochs: int | None
    batch_size: int
    lr: float
    warmup_epochs: float | None
    time_budget: float = 0.0
    model: str | None = None  # the model planned for the rows (`planned_model`); None when one was given
    train_images_per_s: float | None = None
    predict_images_per_s: float | None = None
    estimated_seconds: float | None = None

    @property
    def steps_per_epoch(self) -> int:
        return batches_per_epoch(self.rows, self.batch_size)

    def fill(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with this plan's epochs, batch size, learning rate and warm-up, and its model if it planned one."""
        return dataclasses.replace(cfg, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                   warmup_epochs=self.warmup_epochs, model=self.model or cfg.model)

    def line(self) -> str:
        """The plan in one line: '800 training rows per fold: 300 epochs × 25 steps of 32 = 7,500 steps (...)'."""
        steps = self.steps_per_epoch
        total = self.epochs * steps
        text = (f"{self.rows:,} training rows per fold: {self.epochs} epoch{'s' * (self.epochs != 1)} × {steps:,} "
                f"step{'s' * (steps != 1)} of {self.batch_size} = {total:,} step{'s' * (total != 1)} (lr "
                f"{_sci(self.lr)}, warm-up {self.warmup_epochs:g} epochs)")
        if self.time_budget:
            text += (f", fitted to --time-budget {format_duration(self.time_budget)} at "
                     f"{self.train_images_per_s:,.0f} training images/s per fold (about "
                     f"{format_duration(self.estimated_seconds)} in all)")
        return text


def planned_batch(budget: Budget, rows: int) -> int:
    """The budget's batch size, halved while an epoch of `rows` rows would have fewer than
    MIN_STEPS_PER_EPOCH steps, never below MIN_BATCH (nor above the budget's)."""
    batch = budget.batch_size
    while rows / batch < MIN_STEPS_PER_EPOCH and batch // 2 >= MIN_BATCH:
        batch //= 2
    return batch


def planned_warmup(budget: Budget, epochs: int) -> float:
    """The budget's warm-up, or WARMUP_SHARE of the epochs when that is longer."""
    return round(max(budget.warmup_epochs, WARMUP_SHARE * epochs), 2)


def plan_schedule(cfg: TrainConfig, rows: int) -> tuple[TrainConfig, Plan]:
    """cfg with the schedule's unset settings (None) planned for folds of `rows` training rows from
    its budget (see the module's docstring), and the plan; what is set is kept. With a time budget
    the epochs and warm-up stay unset until `fit_epochs` fits them to the measured throughput."""
    validate_config(cfg)  # a config built in code is checked as a resolved one was
    budget = BUDGETS[cfg.schedule]
    batch = planned_batch(budget, rows) if cfg.batch_size is None else cfg.batch_size
    lr = float(f"{budget.lr * math.sqrt(batch / budget.batch_size):.3g}") if cfg.lr is None else cfg.lr
    epochs = cfg.epochs
    if epochs is None and not cfg.time_budget:
        epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, round(budget.train_images / rows)))
    warmup = cfg.warmup_epochs
    if warmup is None and epochs is not None:
        warmup = planned_warmup(budget, epochs)
    model = cfg.model or planned_model(cfg, rows)
    plan = Plan(rows, epochs, batch, lr, warmup, cfg.time_budget, model=None if cfg.model else model)
    return plan.fill(cfg), plan


def planned_model(cfg: TrainConfig, rows: int) -> str:
    """The model of a run that names none: below SMALL_ROWS training rows a fold a small CNN, which
    learns more from a few hundred images than a ViT from scratch (benchmarks/RESULTS.md), unless a
    model setting (architecture, dropouts: the kvit's) or pretrained weights say otherwise."""
    vit_only = [k for k in MODEL_SETTINGS if getattr(cfg, k)] or cfg.pretrained
    return SMALL_DATA_MODEL if rows < SMALL_ROWS and not vit_only else DEFAULT_MODEL


@dataclass(frozen=True)
class Throughput:
    """Images per second of one fold worker: trained (augmented, optimiser step included) and
    predicted (one view)."""

    train: float
    predict: float


@dataclass(frozen=True)
class Workload:
    """What a run's seconds go to besides the epochs' count: each fold's training, validation and
    test rows, the folds, and how many of them train at once."""

    rows: int
    valid_rows: int
    test_rows: int
    folds: int
    jobs: int


def run_seconds(cfg: TrainConfig, epochs: int, work: Workload, rates: Throughput) -> float:
    """Seconds `epochs` epochs of every fold take at `rates`: their training (the middle epochs of
    `skip_easy` on the rows they keep), the validations `valid_every` asks for and the final
    predictions under cfg's test-time views, `work.jobs` folds at a time."""
    cfg = dataclasses.replace(cfg, epochs=epochs)
    each = range(1, epochs + 1)
    trained = work.rows * sum(1.0 - cfg.skip_easy * easy_share(e) if skips_rows(e, cfg) else 1.0 for e in each)
    # the validation rows' plain view is the best epoch's validation (fold._predict)
    predicted = (work.valid_rows * (sum(validates(e, cfg) for e in each) + cfg.tta - 1)
                 + work.test_rows * cfg.tta)
    return work.folds * (trained / rates.train + predicted / rates.predict) / work.jobs


def fit_epochs(cfg: TrainConfig, plan: Plan, work: Workload, rates: Throughput, spent: float) -> Plan:
    """`plan` with the most epochs (MIN_EPOCHS..MAX_EPOCHS) whose run, at the measured `rates`, takes
    at most BUDGET_SHARE of what `spent` seconds leave of cfg.time_budget, and their warm-up. When
    not even MIN_EPOCHS fit, one line says so, with the estimate and the budget that would do."""
    left = (cfg.time_budget - spent) * BUDGET_SHARE
    epochs = max((e for e in range(MIN_EPOCHS, MAX_EPOCHS + 1) if run_seconds(cfg, e, work, rates) <= left),
                 default=None)
    if epochs is None:
        need = spent + run_seconds(cfg, MIN_EPOCHS, work, rates) / BUDGET_SHARE
        raise KaggleVitError(
            f"--time-budget {format_duration(cfg.time_budget)}: the shortest run, {MIN_EPOCHS} epoch of each of "
            f"{work.folds} folds with their predictions, needs about {format_duration(need)} here (measured: "
            f"{rates.train:,.0f} training and {rates.predict:,.0f} predicted images/s per fold, {work.jobs} fold(s) at "
            f"a time); give --time-budget {format_duration(60 * math.ceil(need / 60))} or more")
    warmup = planned_warmup(BUDGETS[cfg.schedule], epochs) if cfg.warmup_epochs is None else cfg.warmup_epochs
    return dataclasses.replace(plan, epochs=epochs, warmup_epochs=warmup, train_images_per_s=rates.train,
                               predict_images_per_s=rates.predict,
                               estimated_seconds=spent + run_seconds(cfg, epochs, work, rates))


def _rate(count) -> float:
    """Items per second of `count()`, which returns how many it processed."""
    start = time.perf_counter()
    n = count()
    return n / (time.perf_counter() - start)


def measure(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, threads: int,
            teacher: TeacherFor | None = None) -> Throughput:
    """Training and prediction images/s of one fold worker with `threads` CPU threads, on the real
    model and data (and a fold's teacher, whose forward passes each step pays): PROBE_WARMUP_STEPS
    untimed steps, PROBE_STEPS timed training steps of fold 1's training rows at the planned batch
    (augmented as in training), then an untimed prediction batch and a timed pass of
    PROBE_PREDICT_BATCHES over its validation rows."""
    # the probe's own schedule (its learning rates) does not change its speed
    cfg = dataclasses.replace(cfg, epochs=cfg.epochs or MIN_EPOCHS, warmup_epochs=cfg.warmup_epochs or 0.0)
    device, previous = select_device(cfg.device), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(cfg.seed)
        model = create_model(cfg, data.spec)
        data_config = resolve_data_config(model)
        images, labels = data.train.images, data.train.labels
        train = np.flatnonzero(folds != 1)[: PROBE_STEPS * cfg.batch_size]
        valid = np.flatnonzero(folds == 1)[: PROBE_PREDICT_BATCHES * cfg.eval_batch_size]
        batches = train_batches(ImageDataset(images[train], labels[train], data_config=data_config), cfg, device)
        trainer = make_trainer(model, cfg, len(batches), rows=len(train),
                               teacher=None if teacher is None else teacher(data_config))
        batches.set_epoch(cfg.seed)
        train_one_epoch(trainer, itertools.islice(batches, PROBE_WARMUP_STEPS), 0, NoProgress())
        train_rate = _rate(lambda: train_one_epoch(trainer, batches, 0, NoProgress())["seen"])
        amp, first = inference_amp(cfg.amp, device), valid[: cfg.eval_batch_size]
        predict_probs(trainer.forward, ImageDataset(images[first], data_config=data_config), device, amp,
                      cfg.eval_batch_size, pad=cfg.compile)  # untimed: the first call in eval mode
        predicted = ImageDataset(images[valid], data_config=data_config)
        predict_rate = _rate(lambda: len(predict_probs(trainer.forward, predicted, device, amp, cfg.eval_batch_size,
                                                       pad=cfg.compile)))
    finally:
        torch.set_num_threads(previous)
    return Throughput(train_rate, predict_rate)


def budget_plan(cfg: TrainConfig, plan: Plan, data: CompetitionData, folds: np.ndarray, n_folds: int,
                started: float, teacher: TeacherFor | None = None) -> Plan:
    """The plan fitted to cfg.time_budget, counted from `started` (time.monotonic()): the throughput
    measured with the threads each of the fold workers `cv` will start has (one per `auto_jobs`
    job), and with a fold's `teacher` when there is one, then `fit_epochs` for `n_folds` folds."""
    devices = visible_devices(cfg)
    jobs = auto_jobs(cfg, devices, n_folds, data.spec.height * data.spec.width)
    threads = torch.get_num_threads() if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    rates = measure(plan.fill(cfg), data, folds, threads, teacher)
    n_valid = len(folds) / cfg.folds
    # folds sharing a GPU share its throughput: only distinct devices add to it
    at_once = jobs if devices == ["cpu"] else min(jobs, len(devices))
    work = Workload(plan.rows, round(n_valid), len(data.test.images), n_folds, at_once)
    return fit_epochs(cfg, plan, work, rates, time.monotonic() - started)


def write_plan(path: Path, plan: Plan) -> Path:
    """Save the plan (JSON, atomically)."""
    return write_json(path, dataclasses.asdict(plan))


def read_plan(path: Path) -> Plan:
    """A run's saved plan; a damaged one is one line (the plan it held cannot be made again: a new
    measurement would give other epochs than the folds already trained to)."""
    try:
        plan = Plan(**read_json(path))
        counts = (plan.rows, plan.epochs, plan.batch_size)
        if not (all(isinstance(n, int) and n >= 1 for n in counts) and plan.lr > 0 and plan.warmup_epochs >= 0):
            raise ValueError("values out of range")
    except (OSError, ValueError, TypeError) as error:
        raise KaggleVitError(f"{path}: unreadable ({type(error).__name__}); the run's time-budget plan is lost: "
                             f"delete {path.parent} to plan and train it again") from None
    return plan
