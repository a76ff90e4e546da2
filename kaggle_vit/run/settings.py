"""A run's TrainConfig, resolved: the preset, then the competition spec's [train] table, then a
`--config` TOML file, then the command line (`--set` and named options); then the model and shape
that `pretrained` weights name; then the model built once, to check it. Here because it needs the
spec, the config, the weights' reader and the model factory together."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import ARCHITECTURE, DEFAULT_MODEL, PLANNED, PRESETS, TrainConfig, apply_overrides, load_toml, validate_config
from ..errors import KaggleVitError
from ..models.factory import create_model
from ..models.pretrained import weights_architecture
from ..spec import load_spec


def resolve_config(preset: str | None = None, config_file: Path | None = None, **cli: Any) -> TrainConfig:
    """Preset, then the competition spec's [train] table, then TOML file, then command-line
    settings (None = not given) → one TrainConfig. A photo competition's spec can so choose flips, a
    digit one rotation. The PLANNED settings and the model, where none of them gives them, stay
    None, for `schedule.plan_schedule`. The model is built once here, so that an unknown model, an
    impossible shape or unfitting weights fail before any data is read or folder written."""
    from_file = load_toml(config_file) if config_file else {}
    name = preset or from_file.pop("preset", None) or "cpu"
    from_file.pop("preset", None)
    if name not in PRESETS:
        raise KaggleVitError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    cfg = apply_overrides(TrainConfig(**dict.fromkeys((*PLANNED, "model"))), PRESETS[name], f"preset {name}")
    competition = cli.get("competition") or from_file.get("competition") or cfg.competition
    spec = load_spec(competition)
    cfg = apply_overrides(cfg, dict(spec.train_defaults), f"{spec.path} [train]")
    cfg = apply_overrides(cfg, from_file, str(config_file))
    cfg = apply_overrides(cfg, cli, "command line")
    validate_config(cfg)
    cfg = with_weights_architecture(cfg)
    create_model(cfg if cfg.model else dataclasses.replace(cfg, model=DEFAULT_MODEL), spec)
    return cfg


def with_weights_architecture(cfg: TrainConfig) -> TrainConfig:
    """With `pretrained` weights that name their model (a kaggle-vit fold checkpoint, or timm's
    config.json beside the file), that model and shape: the weights decide what they fit."""
    if not cfg.pretrained:
        return cfg
    named = weights_architecture(Path(cfg.pretrained))
    if named is None:
        return cfg
    model, shape = named
    return dataclasses.replace(cfg, model=model, **{**dict.fromkeys(ARCHITECTURE, None), **shape})
