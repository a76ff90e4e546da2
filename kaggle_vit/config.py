"""TrainConfig: every training choice in one dataclass, each key with its type (a choice as a
Literal) and one line of help; presets and their schedule budgets; TOML load/save; every setting,
from any source, typed and checked by its type hint in one place (`checked_settings`); the
reference table of keys, docs/config.md, generated from the dataclass (`python -m kaggle_vit.config`).

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
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .errors import KaggleVitError
from .io import read_toml, write_text


ARCHITECTURE = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "stem_channels", "stem_pool")
# The schedule's settings that `schedule.plan_schedule` plans when they are None (not given).
PLANNED = ("epochs", "batch_size", "lr", "warmup_epochs")
# The model a run trains when none is given (`schedule.planned_model`): the kvit, or below
# SMALL_ROWS training rows a fold, where a ViT from scratch learns less than a linear model on the
# pixels, a small CNN (benchmarks/RESULTS.md, "Any dataset size").
DEFAULT_MODEL, SMALL_DATA_MODEL, SMALL_ROWS = "kvit_pico_patch4_28", "resnet10t", 300


Aug = Literal["rotate", "affine", "flip", "crop", "none"]
Amp = Literal["auto", "bf16", "fp16", "off"]
Switch = Literal["auto", "on", "off"]
TtaMode = Literal["shift", "flip"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
MixupMode = Literal["batch", "pair", "elem"]
Schedule = Literal["cpu", "gpu"]  # the keys of BUDGETS
Distill = Literal["soft", "hard"]


def setting(default: Any, help: str) -> Any:
    """A TrainConfig field with its one line of help, for the reference table (`reference_table`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Model, optimisation, augmentation and CV settings of one run. Built in code, it trains as its
    fields say; `resolve_config` leaves the PLANNED settings None unless given, for `plan_schedule`."""

    competition: str = setting("digit-recognizer", "a bundled competition's name or a spec .toml path")
    model: str | None = setting(DEFAULT_MODEL, "a kvit_* model, or any timm image classifier such as convnext_atto "
                                "(not given: kvit_pico_patch4_28, or resnet10t below 300 training rows a fold)")
    # architecture overrides (None: the registered variant's value)
    patch_size: int | None = setting(None, "side of the square patches; must divide the image size")
    embed_dim: int | None = setting(None, "width of the tokens")
    depth: int | None = setting(None, "transformer blocks")
    num_heads: int | None = setting(None, "attention heads; must divide embed_dim")
    mlp_ratio: float | None = setting(None, "hidden width of each block's MLP, over embed_dim")
    stem_channels: int | None = setting(None, "channels of a convolutional stem's first stage, doubled at each next "
                                              "(0: no stem)")
    stem_pool: bool | None = setting(None, "the stem's stages keep stride 1 and end in a 2x2 max pool")
    drop_rate: float = setting(0.0, "dropout of the embedded tokens and in each block")
    attn_drop_rate: float = setting(0.0, "dropout of the attention weights")
    drop_path_rate: float = setting(0.0, "stochastic depth of the last block (0 at the first, linear between)")
    pretrained: str | None = setting(None, "local weights to start from: a timm .safetensors/.pth/.bin or a fold's "
                                           "model.safetensors")
    pseudo: str | None = setting(None, "a finished cv run (same folds) whose confident test predictions join the "
                                       "training rows")
    pseudo_threshold: float = setting(0.99, "the top probability a test row needs to be pseudo-labelled")
    teacher: str | None = setting(None, "a finished cv run (same folds) whose fold K model teaches fold K (DeiT "
                                        "distillation)")
    distill: Distill = setting("hard", "what the student learns from the teacher: soft (KL of the temperature's "
                                       "probabilities) or hard (the teacher's top class)")
    distill_alpha: float = setting(0.5, "the teacher's share of the training loss, the labels' is the rest")
    distill_temperature: float = setting(1.0, "temperature of both models' probabilities in soft distillation")
    # optimisation (epochs, batch_size, lr, warmup_epochs: None is planned from the training rows and the schedule)
    epochs: int | None = setting(6, "epochs per fold")
    batch_size: int | None = setting(64, "training images per step")
    lr: float | None = setting(4e-3, "peak learning rate of AdamW")
    weight_decay: float = setting(0.05, "AdamW's weight decay (none on biases, norms and embeddings)")
    warmup_epochs: float | None = setting(0.5, "epochs of linear warm-up before the cosine decay")
    layer_decay: float = setting(0.0, "layer-wise learning-rate decay for fine-tuning (timm's): a layer k below the "
                                      "head learns at lr × this^k (0: off; e.g. 0.75)")
    schedule: Schedule = setting("cpu", "the budget the planned keys come from: cpu (batch 64), gpu (batch 512)")
    time_budget: float = setting(0.0, "seconds cv fits its epochs into, by measuring its throughput first (0: off)")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss (and of mixup's soft targets)")
    grad_clip: float = setting(1.0, "the gradients' norm is clipped to this")
    ema: float = setting(0.0, "decay of a moving average of the weights, validated and kept instead of them (0: off)")
    skip_easy: float = setting(0.0, "share of the rows already fitted (loss below the mean) each middle epoch leaves "
                                    "out (0: off)")
    valid_every: int = setting(1, "validate every N epochs and after the last (0: after the last only)")
    # augmentation (albumentations, applied to uint8 training images only)
    aug: Aug = setting("affine", "rotate, affine (+ scale and shift): digits; flip, crop (mirrored): photos; none")
    rotate: float = setting(10.0, "degrees of random rotation, either way")
    scale: float = setting(0.1, "random scaling of each axis, 1 ± this (affine, flip)")
    shift: float = setting(0.1, "random shift of each axis, ± this share of its size (affine, flip)")
    aug_group: int = setting(8, "images per albumentations call; a group shares one random draw")
    # mixing images and their labels (timm's Mixup, on the device; training then uses soft targets)
    mixup: float = setting(0.0, "alpha of mixup's Beta(alpha, alpha) blend of image pairs (0: off; e.g. 0.8)")
    cutmix: float = setting(0.0, "alpha of CutMix's Beta(alpha, alpha) patch-pasting of image pairs (0: off; e.g. 1.0)")
    mixup_prob: float = setting(1.0, "chance that mixup or CutMix is applied (to a batch, pair or image: mixup_mode)")
    mixup_switch_prob: float = setting(0.5, "with both mixup and cutmix on, the chance of CutMix instead of mixup")
    mixup_mode: MixupMode = setting("batch", "one draw per batch, per pair of images, or per image")
    # cross-validation and runtime
    folds: int = setting(5, "stratified folds the training rows are split into")
    seed: int = setting(42, "seed of the folds, the weights and the augmentation (cv --seeds counts up from it)")
    amp: Amp = setting("auto", "mixed precision; auto: bf16 on a GPU that computes in it, fp16 on older ones, off "
                               "on a CPU")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    devices: str = setting("all", "GPUs the folds are spread over: all visible, or indices such as 0,1")
    data_on_device: Switch = setting("auto", "training images kept and augmented on the GPU (auto: when they fit)")
    num_workers: int = setting(-1, "DataLoader workers (-1: chosen from the CPU count)")
    jobs: int = setting(0, "folds trained at once in worker processes (0: auto)")
    eval_batch_size: int = setting(128, "images per step when validating and predicting")
    tta: int = setting(3, "test-time views for the OOF and test predictions, 1 (off) to 9")
    tta_mode: TtaMode = setting("shift", "shift: one-pixel shifts (digits); flip: mirror images and their shifts "
                                         "(photos)")
    compile: bool = setting(False, "torch.compile the model")
    compile_mode: CompileMode = setting("default", "torch.compile's mode (reduce-overhead: CUDA graphs)")

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


BUDGETS: dict[Schedule, Budget] = {
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

_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
# Settings added after run folders were first named from the settings' hash.
ADDED_LATER = ("skip_easy", "valid_every", "time_budget", "layer_decay", "mixup", "cutmix", "mixup_prob",
               "mixup_switch_prob", "mixup_mode", "teacher", "distill", "distill_alpha", "distill_temperature")


@dataclass(frozen=True)
class Kind:
    """What a key takes, read from its type hint: a value type, a Literal's choices, and whether
    None (not set) is allowed."""

    type: type
    choices: tuple[str, ...] = ()
    optional: bool = False


def _kind(hint: Any) -> Kind:
    optional = type(None) in get_args(hint)
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    if get_origin(base) is Literal:
        return Kind(str, get_args(base), optional)
    return Kind(base, (), optional)


KINDS: dict[str, Kind] = {name: _kind(hint) for name, hint in get_type_hints(TrainConfig).items()}
_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _typed(value: Any, kind: Kind) -> Any:
    """`value` as `kind`'s type: text (`--set`'s) read as a number or true/false, a whole float as an
    int, a path as text; anything else raises ValueError."""
    if kind.type is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if kind.type is bool and (isinstance(value, bool) or value in ("true", "false")):
        return value is True or value == "true"
    if kind.type in (int, float) and isinstance(value, str):
        return kind.type(value)
    if kind.type in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind.type is int and value != int(value):
            raise ValueError(value)
        return kind.type(value)
    raise ValueError(value)


def _coerce(name: str, value: Any) -> Any:
    """`value` typed for key `name` by its type hint, a Literal's choice checked: the one place keys,
    types and choices are checked, for every source (preset, spec, file, `--set`, code)."""
    if name not in KINDS:
        close = difflib.get_close_matches(name, KINDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(KINDS))}"
        raise KaggleVitError(f"unknown key '{name}'; {hint}")
    kind = KINDS[name]
    if value is None and kind.optional:
        return None
    try:
        typed = _typed(value, kind)
    except (TypeError, ValueError, OverflowError):
        raise KaggleVitError(f"{name} = {value!r} must be {_WORDS[kind.type]}") from None
    if kind.choices and typed not in kind.choices:
        raise KaggleVitError(f"{name} = {typed!r} must be one of {', '.join(kind.choices)}")
    return typed


def checked_settings(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` typed and checked by their keys' type hints (None: not given, left out); an error
    is one line naming `source`."""
    try:
        return {k: _coerce(k, v) for k, v in values.items() if v is not None}
    except KaggleVitError as error:
        raise KaggleVitError(f"{source}: {error}") from None


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """A copy of `cfg` with `values` applied (None means 'not given' and is skipped), checked."""
    return dataclasses.replace(cfg, **checked_settings(values, source))


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` items as settings, each value read as its key's type (a string key's as
    written: `--set aug=flip`, `--set pretrained=w.pth`); a later item wins."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise KaggleVitError(f"--set {item}: give key=value, e.g. --set aug=flip")
        values[key.strip()] = text.strip()
    return checked_settings(values, "--set")


def check_settings(values: dict[str, Any], source: str) -> None:
    """Check settings as a run takes them (known keys, their types, workable values), naming `source`:
    a spec's [train] table is checked when the spec loads, not first when `cv` starts."""
    if "competition" in values:
        raise KaggleVitError(f"{source}: competition cannot be set here: the spec is the competition")
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
    """Reject settings that cannot work, before anything trains: every key's type and choice (as
    `checked_settings` checks them, for a config built in code), then the values' ranges."""
    for f in fields(cfg):
        _coerce(f.name, getattr(cfg, f.name))
    if cfg.devices != "all" and not all(part.strip().isdigit() for part in cfg.devices.split(",")):
        raise KaggleVitError(f"devices {cfg.devices}: give GPU indices such as 0,1, or all")
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
    for name in ("layer_decay", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise KaggleVitError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("mixup", "cutmix"):
        if not getattr(cfg, name) >= 0:
            raise KaggleVitError(f"{name} is a Beta distribution's alpha, 0 (off) or more, got {getattr(cfg, name)}")
    if not 0 <= cfg.ema < 1:
        raise KaggleVitError(f"ema is a decay in [0, 1) (0: off), got {cfg.ema}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise KaggleVitError(f"lr must be positive, got {cfg.lr}")
    if cfg.warmup_epochs is not None and not cfg.warmup_epochs >= 0:
        raise KaggleVitError(f"warmup_epochs must be 0 or more, got {cfg.warmup_epochs}")
    if not cfg.time_budget >= 0:
        raise KaggleVitError(f"time_budget is in seconds (0: off), got {cfg.time_budget}")
    if cfg.time_budget and cfg.epochs is not None:
        raise KaggleVitError(f"--time-budget {cfg.time_budget:g}s plans the epochs: leave epochs out (--epochs, or "
                             f"a config file's), or give --time-budget 0 to train {cfg.epochs} epochs")
    if not 0 < cfg.pseudo_threshold <= 1:
        raise KaggleVitError(f"pseudo_threshold is a probability in (0, 1], got {cfg.pseudo_threshold}")
    if not 0 < cfg.distill_alpha <= 1:
        raise KaggleVitError(f"distill_alpha is the teacher's share of the loss, in (0, 1], got {cfg.distill_alpha}")
    if not cfg.distill_temperature > 0:
        raise KaggleVitError(f"distill_temperature must be positive, got {cfg.distill_temperature}")


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


def reference_table() -> str:
    """docs/config.md: every TrainConfig key with its type, default and one line of help, and what
    each preset changes, generated from the dataclass so that the reference cannot drift from it."""
    lines = ["# Training settings", "",
             "<!-- Generated from kaggle_vit/config.py by `python -m kaggle_vit.config > docs/config.md`: "
             "edit TrainConfig, not this file. -->", "",
             "Every key of `TrainConfig`. Set one with `--set key=value` (`cv`, `tune`, `bench`; repeatable, the "
             "value read as the key's type), in a config file (`cv --config run.toml`: `key = value` lines, at the "
             "top level or under `[train]`), or in a competition spec's `[train]` table. Later sources win: the "
             "preset, the spec's `[train]`, the config file, the command line. A key marked *planned* is, unless "
             "given, planned from the training rows and the preset's schedule before the first step "
             "(`kaggle-vit cv` prints the plan).", "",
             "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for f in fields(TrainConfig):
        kind = KINDS[f.name]
        shown = ", ".join(f"`{c}`" for c in kind.choices) if kind.choices else kind.type.__name__
        default = ("*planned*" if f.name in PLANNED else "not set" if f.default is None
                   else f"`{_toml_value(f.default)}`")
        lines.append(f"| `{f.name}` | {shown} | {default} | {f.metadata['help']} |")
    lines += ["", "The presets (`--preset`, or `preset = \"gpu\"` in a config file) change these defaults:", ""]
    for name, values in PRESETS.items():
        lines.append(f"- `{name}`: " + ", ".join(f"`{k} = {_toml_value(v)}`" for k, v in values.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m kaggle_vit.config > docs/config.md
    print(reference_table(), end="")
