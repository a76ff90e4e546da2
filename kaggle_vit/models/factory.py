"""Model factory: our registered ViTs and timm's reference ViTs, shaped to the competition, from
scratch, from local weights, or from a fold checkpoint.

With weights, timm does the fitting: `create_model(name, pretrained=True, pretrained_cfg_overlay=...)`
runs the model family's checkpoint filter (a ViT's position embedding resampled to the new patch
grid) and adapts the first convolution to the channel count. Here the file is read once, checked,
and a head whose class count differs is replaced by the new model's freshly initialised one, so the
load stays strict: any other tensor that does not fit is an error, never a silently random layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..config import TrainConfig
from ..errors import KaggleVitError
from ..records import CheckpointHeader
from ..spec import CompetitionSpec
from . import vit  # noqa: F401  (registers the kvit_* family with timm)
from .pretrained import fresh_head, read_weights, source_channels


def fitting_patch_size(spec: CompetitionSpec) -> int:
    """The divisor of the image nearest a 7×7 patch grid (4 for 28×28): timm ViTs' 16 fits no MNIST."""
    sizes = spec.patch_sizes(limit=min(spec.height, spec.width))
    if not sizes:
        raise KaggleVitError(f"{spec.path}: {spec.height}x{spec.width} has no patch size > 1 that divides it")
    return min(sizes, key=lambda p: abs(spec.height / p - 7))


def model_kwargs(cfg: TrainConfig, spec: CompetitionSpec) -> dict[str, Any]:
    """Keyword arguments for timm.create_model: the competition's shape plus the config's choices."""
    if not timm.is_model(cfg.model):  # a name, or name.tag (a pretrained config of it)
        raise KaggleVitError(f"unknown model '{cfg.model}' (ours: {', '.join(timm.list_models('kvit*'))}; or a timm ViT)")
    kwargs: dict[str, Any] = dict(
        num_classes=spec.num_classes, in_chans=spec.channels, img_size=(spec.height, spec.width),
        drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
        **cfg.model_overrides(),
    )
    if not cfg.model.startswith("kvit"):
        for name in ("stem_channels", "stem_pool"):
            if name in kwargs:
                raise KaggleVitError(f"{name} applies to kvit models only, not '{cfg.model}'")
        if cfg.pretrained:  # the weights fix the patch size and the image size (images are resized to it)
            if "patch_size" in kwargs:
                raise KaggleVitError(f"pretrained: {cfg.model} keeps the patch size of its weights; "
                                     f"drop patch_size {kwargs['patch_size']}")
            del kwargs["img_size"]
            return kwargs
        kwargs.setdefault("patch_size", fitting_patch_size(spec))
    patch = kwargs.get("patch_size")
    if patch is not None and (spec.height % patch or spec.width % patch):
        raise KaggleVitError(f"patch_size {patch} does not divide {spec.height}x{spec.width}; use one of {spec.patch_sizes()}")
    return kwargs


def create_model(cfg: TrainConfig, spec: CompetitionSpec) -> nn.Module:
    """Build the config's model for the competition, with the local weights of `cfg.pretrained` when
    given (nothing is ever downloaded)."""
    kwargs = model_kwargs(cfg, spec)
    if cfg.pretrained:
        return create_pretrained(cfg.model, kwargs, Path(cfg.pretrained))
    return build(cfg.model, kwargs)


def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model with a clear error for impossible shapes."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (ValueError, TypeError, AssertionError) as error:
        raise KaggleVitError(f"cannot build {name} with {kwargs}: {error}") from None


def create_pretrained(name: str, kwargs: dict[str, Any], path: Path) -> nn.Module:
    """`name` built with `kwargs` and the weights in `path` loaded into it by timm (position
    embedding resized, input convolution adapted, head re-initialised when the classes differ)."""
    state = read_weights(path)
    model = build(name, kwargs)  # its fresh head, if the classes differ
    state = fresh_head(state, model)
    channels = kwargs.get("in_chans", 3) if name.startswith("kvit") else source_channels(state, model)
    size = tuple(model.pretrained_cfg.get("input_size") or (channels, 224, 224))
    overlay = {"state_dict": state, "num_classes": kwargs.get("num_classes", model.num_classes),
               "input_size": (channels, *size[1:])}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, ValueError, KeyError) as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error).strip())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise KaggleVitError(f"pretrained {path}: the weights do not fit {name}: {detail}") from None


def model_from(header: CheckpointHeader, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The model a fold checkpoint's header describes, with its best weights, in eval mode."""
    model = build(header.model, header.kwargs)
    model.load_state_dict(state_dict)
    return model.eval()
