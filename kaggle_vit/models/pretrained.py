"""Local pretrained weights (`--set pretrained=PATH`): a timm checkpoint (.safetensors, .pth, .bin) or a
kaggle-vit fold checkpoint (model.safetensors; an older kaggle-vit's model.pt is read weights-only),
read offline, checked, and the model they name; `factory.create_pretrained` loads them through
timm's own pretrained path. Nothing here unpickles anything but tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from torch import nn

from ..config import ARCHITECTURE
from ..errors import KaggleVitError
from ..records import CheckpointHeader
from . import vit  # noqa: F401  (registers the kvit_* family with timm: weights may be named after one)
from .checkpoint import METADATA_KEY

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")


def _check_path(path: Path) -> None:
    if not path.is_file():
        raise KaggleVitError(f"pretrained {path}: no such file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise KaggleVitError(f"pretrained {path}: expected a {', '.join(WEIGHT_SUFFIXES)} weights file")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (a training checkpoint's `state_dict`/`model` entry unwrapped,
    as timm's `load_state_dict` does); an unreadable file or one without tensors is one line."""
    _check_path(path)
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch and safetensors raise many kinds for a damaged file
        raise KaggleVitError(f"pretrained {path}: not a readable weights file ({type(error).__name__})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KaggleVitError(f"pretrained {path}: holds no state dict of tensors")
    return state


def _fold_architecture(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The model name and keywords in a kaggle-vit fold checkpoint's safetensors header (JSON); None
    for safetensors weights without them (timm's)."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            text = (weights.metadata() or {}).get(METADATA_KEY)
        if text is None:
            return None
        header = CheckpointHeader.from_json(json.loads(text))
        return header.model, header.kwargs
    except Exception as error:  # noqa: BLE001 - safetensors and json raise many kinds for a damaged file
        raise KaggleVitError(f"pretrained {path}: not a readable weights file ({type(error).__name__})") from None


def _pickled_architecture(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The model name and keywords in a fold checkpoint of an older kaggle-vit (model.pt), read
    weights-only as timm's .pth files are: tensors and plain values, nothing that runs."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise KaggleVitError(f"pretrained {path}: not a readable weights file ({type(error).__name__})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), str) and isinstance(checkpoint.get("kwargs"), dict):
        return checkpoint["model"], checkpoint["kwargs"]
    return None


def weights_architecture(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The model name and shape keywords the weights name, when they name them: a kaggle-vit fold
    checkpoint carries both; timm's hub layout has a `config.json` with `architecture` beside the
    file; otherwise a file or folder named after a timm model (`vit_tiny_patch16_224.augreg_in21k.safetensors`).
    None for a bare state dict, whose model is the config's `model`."""
    _check_path(path)
    readers = {".safetensors": _fold_architecture, ".pt": _pickled_architecture}
    fold = readers[path.suffix](path) if path.suffix in readers else None
    if fold is not None:
        name, kwargs = fold
        return name, {k: kwargs[k] for k in ARCHITECTURE if k in kwargs}
    config = path.with_name("config.json")
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("architecture")
        except (ValueError, AttributeError):
            raise KaggleVitError(f"{config}: not a timm config.json (no readable 'architecture')") from None
        return (name, {}) if isinstance(name, str) else None
    if path.suffix == ".pt":
        return None
    named = next((n for n in (path.stem, path.parent.name) if timm.is_model(n)), None)
    return (named, {}) if named else None


def fresh_head(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights with the classifier replaced by `model`'s own (just initialised) when the class
    count differs: the head is re-initialised, and every other tensor must still fit exactly."""
    names = model.pretrained_cfg.get("classifier") or ()
    own = model.state_dict()
    out = dict(state)
    for name in (names,) if isinstance(names, str) else names:
        for key in (f"{name}.weight", f"{name}.bias"):
            if key in out and key in own and out[key].shape != own[key].shape:
                out[key] = own[key].clone()
    return out


def source_channels(state: dict[str, torch.Tensor], model: nn.Module) -> int:
    """The channel count the weights were trained on, from their first convolution."""
    first = model.pretrained_cfg.get("first_conv")
    weight = state.get(f"{first}.weight") if isinstance(first, str) else None
    if weight is not None and weight.ndim == 4:
        return int(weight.shape[1])
    return int((model.pretrained_cfg.get("input_size") or (3,))[0])


def find_weights(root: Path, skip: tuple[str, ...] = ()) -> Path | None:
    """The first weights file (by path) in the datasets under `root` (Kaggle's /kaggle/input), the
    folders named in `skip` (the competition's own files) left out; None when there is none."""
    if not root.is_dir():
        return None
    found = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                   and p.relative_to(root).parts[0] not in skip)
    return found[0] if found else None
