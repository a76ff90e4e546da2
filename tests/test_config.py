"""TrainConfig's keys: typed and checked from their type hints in one place, and documented in
docs/config.md, generated from the dataclass."""
from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from kaggle_vit.config import BUDGETS, Schedule, TrainConfig, apply_overrides, parse_set, reference_table, validate_config
from kaggle_vit.errors import KaggleVitError

ROOT = Path(__file__).resolve().parents[1]


def test_committed_reference_table_is_in_sync():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference_table(), "regenerate it: python -m kaggle_vit.config > docs/config.md"
    assert "(config.md)" in (ROOT / "docs" / "training.md").read_text()  # linked from the training guide


def test_set_reads_each_value_as_its_keys_type():
    assert parse_set(["compile=true", "lr=1e-3", "patch_size=7", "pretrained=w/model.safetensors", "devices=0,1",
                      "aug=flip", "tta=2", "tta=3"]) == {
        "compile": True, "lr": 0.001, "patch_size": 7, "pretrained": "w/model.safetensors", "devices": "0,1",
        "aug": "flip", "tta": 3}  # a later item wins
    assert type(parse_set(["rotate=15"])["rotate"]) is float


def test_file_values_are_typed_by_the_same_hints():
    cfg = apply_overrides(TrainConfig(), {"epochs": 3.0, "lr": 1, "pretrained": Path("w.pth")}, "run.toml")
    assert (cfg.epochs, type(cfg.epochs), cfg.lr, type(cfg.lr), cfg.pretrained) == (3, int, 1.0, float, "w.pth")
    with pytest.raises(KaggleVitError, match=r"^run.toml: epochs = True must be a whole number$"):
        apply_overrides(TrainConfig(), {"epochs": True}, "run.toml")
    with pytest.raises(KaggleVitError, match=r"^run.toml: compile = 1 must be true or false$"):
        apply_overrides(TrainConfig(), {"compile": 1}, "run.toml")


def test_a_config_built_in_code_is_checked_by_the_same_choices():
    with pytest.raises(KaggleVitError, match=r"^aug = 'spin' must be one of rotate, affine, flip, crop, none$"):
        validate_config(TrainConfig(aug="spin"))
    with pytest.raises(KaggleVitError, match=r"^amp = 'fp8' must be one of auto, bf16, fp16, off$"):
        validate_config(TrainConfig(amp="fp8"))


def test_every_schedule_choice_has_a_budget():
    assert set(get_args(Schedule)) == set(BUDGETS)
