"""TrainConfig: every training choice in one dataclass; presets and their schedule budgets; TOML
load/save; overrides, checked.

A run's config is resolved from these with the competition's spec and the weights it starts from
(`run.settings.resolve_config`). What none of them gives of the schedule (epochs, batch size,
learning rate, warm-up) is left None, and planned from the training rows
(`train.schedule.plan_schedule`) once the data is known.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import KaggleVitError
from .io import read_toml, write_text


ARCHITECTURE = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "stem_channels", "stem_pool")
# The schedule's settings that `schedule.plan_schedule` plans when they are None (not given).
PLANNED = ("epochs", "batch_size", "lr", "warmup_epochs")


@dataclass
class TrainConfig:
    """Model, optimisation, augmentation and CV settings of one run. Built in code, it trains as its
    fields say; `resolve_config` leaves the PLANNED settings None unless given, for `plan_schedule`."""

    competition: str = "digit-recognizer"
    model: str = "kvit_pico_patch4_28"
    # architecture overrides (None: the registered variant's value)
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    stem_channels: int | None = None
    stem_pool: bool | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pretrained: str | None = None  # local weights to start from: a timm .safetensors/.pth/.bin or a fold's model.safetensors
    pseudo: str | None = None  # a finished cv run whose confident test predictions join the training rows
    pseudo_threshold: float = 0.99  # the top probability a test row needs to be pseudo-labelled
    # optimisation (epochs, batch_size, lr, warmup_epochs: None is planned from the training rows and the schedule)
    epochs: int | None = 6
    batch_size: int | None = 64
    lr: float | None = 4e-3
    weight_decay: float = 0.05
    warmup_epochs: float | None = 0.5
    schedule: str = "cpu"  # the budget (BUDGETS) the schedule's unset settings are planned from
    time_budget: float = 0.0  # seconds cv fits its epochs into, by measuring its throughput first; 0: off
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.0  # decay of a moving average of the weights, validated and kept instead of them; 0: off
    skip_easy: float = 0.0  # share of the rows already fitted (loss below the mean) each middle epoch leaves out; 0: off
    valid_every: int = 1  # validate every N epochs and after the last (0: after the last only); only those can be kept
    # augmentation (albumentations, applied to uint8 training images only)
    aug: str = "affine"  # affine (rotate, scale, shift) | rotate | flip, crop (photos) | none
    rotate: float = 10.0
    scale: float = 0.1
    shift: float = 0.1
    aug_group: int = 8  # images per albumentations call; a group shares one random draw
    # cross-validation and runtime
    folds: int = 5
    seed: int = 42
    amp: str = "auto"  # auto | bf16 | fp16 | off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: str = "all"  # GPUs the folds are spread over: all visible, or indices such as "0,1"
    data_on_device: str = "auto"  # training images on the GPU, augmented there: auto (when they fit) | on | off
    num_workers: int = -1  # -1: chosen from the CPU count
    jobs: int = 0  # folds trained at once in worker processes; 0: auto (device.auto_jobs)
    eval_batch_size: int = 128  # measured faster than 256 with two fold workers on a CPU (benchmarks/RESULTS.md)
    tta: int = 3  # test-time views for the OOF and test predictions
    tta_mode: str = "shift"  # shift: one-pixel shifts (digits) | flip: mirror images and their shifts (photos)
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune

    def model_overrides(self) -> dict[str, Any]:
        """Architecture keywords given explicitly (not None), for timm.create_model."""
        return {n: getattr(self, n) for n in ARCHITECTURE if getattr(self, n) is not None}

    def result_settings(self) -> dict[str, Any]:
        """The settings that change results: all but where and how fast the run goes (device,
        GPUs, DataLoader workers, evaluation batch size, folds trained at once, compile mode), and
        settings added since runs were first named while they are off (so a run folder keeps its
        name, and resumes, across versions). The schedule's budget counts only while something is
        left to plan from it (with a time budget, the epochs): once planned, the plan is the settings."""
        skip = {"device", "devices", "num_workers", "eval_batch_size", "jobs", "compile_mode"}
        skip |= {k for k in ADDED_LATER if getattr(self, k) == _DEFAULTS[k]}
        if all(getattr(self, k) is not None for k in PLANNED):
            skip.add("schedule")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def fingerprint(self) -> str:
        """Short hash of `result_settings`: the same settings give the same run folder."""
        return hashlib.sha256(json.dumps(self.result_settings(), sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Budget:
    """A preset's schedule in the data's terms: the images one fold trains on over its schedule, and
    the batch size, learning rate and warm-up (in epochs, at least) it was tuned at."""

    train_images: int
    batch_size: int
    lr: float
    warmup_epochs: float


BUDGETS: dict[str, Budget] = {
    # Chosen by measurement on digit-recognizer's 33,600 training rows per fold (benchmarks/RESULTS.md):
    # eleven epochs of batch 64 on a CPU; thirty of batch 512 on an H100-class GPU (the learning rate
    # scaled from 2e-3 at batch 256 by the square root of the batch ratio).
    "cpu": Budget(train_images=11 * 33_600, batch_size=64, lr=4e-3, warmup_epochs=0.5),
    "gpu": Budget(train_images=30 * 33_600, batch_size=512, lr=2.8e-3, warmup_epochs=2.0),
}

PRESETS: dict[str, dict[str, Any]] = {
    # The middle epochs skip 60% of the rows already learnt; validated after the last epoch only.
    "cpu": {"schedule": "cpu", "skip_easy": 0.6, "valid_every": 0},
    # An H100-class GPU: a wider, deeper model, a longer schedule, compiled, and batches big enough to keep it busy.
    "gpu": {"schedule": "gpu", "model": "kvit_small_patch4_28", "aug": "affine", "label_smoothing": 0.1,
            "drop_path_rate": 0.1, "eval_batch_size": 2048, "compile": True},
}

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
# Settings added after run folders were first named from the settings' hash.
ADDED_LATER = ("skip_easy", "valid_every", "time_budget")
AUGMENTATIONS = ("rotate", "affine", "flip", "crop", "none")


def _coerce(name: str, value: Any, source: str) -> Any:
    if name not in _FIELDS:
        close = difflib.get_close_matches(name, _FIELDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(_FIELDS))}"
        raise KaggleVitError(f"{source}: unknown key '{name}'; {hint}")
    default = getattr(TrainConfig(), name)
    annotation = str(_FIELDS[name].type)
    kind = type(default) if default is not None else (
        bool if "bool" in annotation else float if "float" in annotation else str if "str" in annotation else int)
    if value is None:
        return None
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise KaggleVitError(f"{source}: setting '{name}' = {value!r} should be {kind.__name__}") from None


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """A copy of `cfg` with `values` applied (None means 'not given' and is skipped)."""
    clean = {k: _coerce(k, v, source) for k, v in values.items() if v is not None}
    return dataclasses.replace(cfg, **clean)


def check_settings(values: dict[str, Any], source: str) -> None:
    """Check settings as a run takes them (known keys, their types, workable values), naming `source`:
    a spec's [train] table is checked when the spec loads, not first when `cv` starts."""
    if "competition" in values:
        raise KaggleVitError(f"{source}: competition cannot be set here: the spec is the competition")
    # an unknown key or a wrong type names `source`
    cfg = apply_overrides(TrainConfig(**dict.fromkeys(PLANNED)), values, source)
    try:
        validate_config(cfg)
    except KaggleVitError as error:
        raise KaggleVitError(f"{source}: {error}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a run TOML (flat keys, or under [train]); 'preset' may name a preset."""
    data = read_toml(path, "config file")
    return dict(data.get("train", data))


def validate_config(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, before anything trains."""
    if cfg.aug not in AUGMENTATIONS:
        raise KaggleVitError(f"aug must be one of {', '.join(AUGMENTATIONS)}, got '{cfg.aug}'")
    if cfg.tta_mode not in ("shift", "flip"):
        raise KaggleVitError(f"tta_mode must be shift or flip, got '{cfg.tta_mode}'")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise KaggleVitError(f"amp must be auto, bf16, fp16 or off, got '{cfg.amp}'")
    if cfg.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise KaggleVitError(f"compile_mode must be default, reduce-overhead, max-autotune or "
                             f"max-autotune-no-cudagraphs, got '{cfg.compile_mode}'")
    if cfg.devices != "all" and not all(part.strip().isdigit() for part in cfg.devices.split(",")):
        raise KaggleVitError(f"--devices {cfg.devices}: give GPU indices such as 0,1, or all")
    if cfg.data_on_device not in ("auto", "on", "off"):
        raise KaggleVitError(f"data_on_device must be auto, on or off, got '{cfg.data_on_device}'")
    if cfg.jobs < 0:
        raise KaggleVitError(f"jobs must be 0 (auto) or more, got {cfg.jobs}")
    for name in ("epochs", "batch_size", "folds", "aug_group"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise KaggleVitError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.valid_every < 0:
        raise KaggleVitError(f"valid_every is a number of epochs (0: validate after the last only), got {cfg.valid_every}")
    if not 1 <= cfg.tta <= 9:
        raise KaggleVitError(f"tta must be 1 (off) to 9 views, got {cfg.tta}")
    if not 0 <= cfg.skip_easy < 1:
        raise KaggleVitError(f"skip_easy is a share of rows in [0, 1) (0: off), got {cfg.skip_easy}")
    if not 0 <= cfg.ema < 1:
        raise KaggleVitError(f"ema is a decay in [0, 1) (0: off), got {cfg.ema}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise KaggleVitError(f"lr must be positive, got {cfg.lr}")
    if cfg.warmup_epochs is not None and not cfg.warmup_epochs >= 0:
        raise KaggleVitError(f"warmup_epochs must be 0 or more, got {cfg.warmup_epochs}")
    if cfg.schedule not in BUDGETS:
        raise KaggleVitError(f"schedule must be one of {', '.join(BUDGETS)}, got '{cfg.schedule}'")
    if not cfg.time_budget >= 0:
        raise KaggleVitError(f"time_budget is in seconds (0: off), got {cfg.time_budget}")
    if cfg.time_budget and cfg.epochs is not None:
        raise KaggleVitError(f"--time-budget {cfg.time_budget:g}s plans the epochs: leave epochs out (--epochs, or "
                             f"a config file's), or give --time-budget 0 to train {cfg.epochs} epochs")
    if not 0 < cfg.pseudo_threshold <= 1:
        raise KaggleVitError(f"pseudo_threshold is a probability in (0, 1], got {cfg.pseudo_threshold}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(value)


def to_toml(cfg: TrainConfig, header: str = "") -> str:
    """The config as TOML that `--config` reads back unchanged (None values are left out)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in dataclasses.asdict(cfg).items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: Path, header: str = "") -> Path:
    """Write the resolved config as TOML, atomically."""
    return write_text(path, to_toml(cfg, header))
