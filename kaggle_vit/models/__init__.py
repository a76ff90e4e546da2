"""Model factory: our registered ViTs and timm's reference ViTs, shaped to the competition."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..competition import CompetitionSpec
from ..config import TrainConfig
from ..errors import KaggleVitError
from . import vit  # noqa: F401  (registers the kvit_* family with timm)
from .pretrained import create_pretrained
from .vit import KaggleViT

__all__ = ["KaggleViT", "create_model", "fitting_patch_size", "model_kwargs"]


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
                raise KaggleVitError(f"--pretrained: {cfg.model} keeps the patch size of its weights; "
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
