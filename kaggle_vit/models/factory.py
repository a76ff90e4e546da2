"""Model factory: our registered ViTs and any timm image classifier (ViTs, ConvNeXt, ResNet, EfficientNet,
...), shaped to the competition, from scratch, from local weights, or from a fold checkpoint.

With weights, timm does the fitting: `create_model(name, pretrained=True, pretrained_cfg_overlay=...)`
runs the model family's checkpoint filter (a ViT's position embedding resampled to the new patch
grid) and adapts the first convolution to the channel count. Here the file is read once, checked,
and a head whose class count differs is replaced by the new model's freshly initialised one, so the
load stays strict: any other tensor that does not fit is an error, never a silently random layer.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import timm
import torch
from torch import nn

from ..config import ARCHITECTURE, TrainConfig
from ..errors import KaggleVitError
from ..records import CheckpointHeader
from ..spec import CompetitionSpec
from . import vit  # noqa: F401  (registers the kvit_* family with timm)
from .pretrained import fresh_head, read_weights, source_channels

DROPOUTS = ("drop_rate", "attn_drop_rate", "drop_path_rate")
MODEL_SETTINGS = (*ARCHITECTURE, *DROPOUTS)  # the settings a model takes as keywords; the rest train any model


def fitting_patch_size(spec: CompetitionSpec) -> int:
    """The divisor of the image nearest a 7×7 patch grid (4 for 28×28): timm ViTs' 16 fits no MNIST."""
    sizes = spec.patch_sizes(limit=min(spec.height, spec.width))
    if not sizes:
        raise KaggleVitError(f"{spec.path}: {spec.height}x{spec.width} has no patch size > 1 that divides it")
    return min(sizes, key=lambda p: abs(spec.height / p - 7))


@functools.cache
def constructor(name: str) -> Mapping[str, Any]:
    """The keywords the class behind timm's `name` takes (through `**kwargs`, its bases' too), with
    their defaults, from a build on the meta device (nothing allocated or initialised)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    keywords: dict[str, Any] = {}
    for cls in type(model).__mro__:  # DeiT's distilled ViT takes (*args, **kwargs) for VisionTransformer's
        params = inspect.signature(cls.__init__).parameters.values()
        keywords |= {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if all(p.kind != p.VAR_KEYWORD for p in params):
            break
    return MappingProxyType(keywords)


@functools.cache
def takes_images(name: str, shape: tuple[int, int, int], patch_size: int | None = None) -> bool:
    """Whether `name` (with this stem patch size; None: its own) turns (C, H, W) images into logits,
    by a forward on the meta device: shapes only, no arithmetic."""
    extra = {} if patch_size is None else {"patch_size": patch_size}
    try:
        with torch.device("meta"):
            timm.create_model(name, in_chans=shape[0], **extra).eval()(torch.empty(1, *shape))
    except (RuntimeError, ValueError):
        return False
    return True


def fitting_stem(name: str, spec: CompetitionSpec, default: Any) -> int | None:
    """A patchify stem's stride (ConvNeXt's) for small images: None while the model's own leaves its
    last stage a pixel, else the largest divisor of the image below `default` that does (ConvNeXt at
    28×28: 1, as its 2 strides the first stage too)."""
    shape = (spec.channels, spec.height, spec.width)
    below = range(default - 1, 0, -1) if isinstance(default, int) else ()
    smaller = [p for p in below if not (spec.height % p or spec.width % p)]
    return next((p for p in [None, *smaller] if takes_images(name, shape, p)), None)


def _known_model(name: str) -> None:
    """Refuse in one line a name timm has no model for."""
    if not timm.is_model(name):  # a name, or name.tag (a pretrained config of it)
        raise KaggleVitError(f"unknown model '{name}' (ours: {', '.join(timm.list_models('kvit*'))}; "
                             f"or any timm image classifier, such as convnext_atto or resnet18)")


def model_settings(name: str) -> frozenset[str]:
    """The settings of MODEL_SETTINGS that `name` has a keyword for: all of them for ours, those its
    constructor takes for a timm model (a ResNet: the dropouts only)."""
    _known_model(name)
    if name.startswith("kvit"):
        return frozenset(MODEL_SETTINGS)
    return frozenset(k for k in MODEL_SETTINGS if k in constructor(name))


def check_settings(name: str, keys: Iterable[str], where: str = "") -> None:
    """Refuse in one line the first model setting in `keys` that `name` has no keyword for: it would
    change nothing, so it is an error, never silently ignored."""
    taken = model_settings(name)
    refused = next((k for k in keys if k in MODEL_SETTINGS and k not in taken), None)
    if refused:
        raise KaggleVitError(f"{where}{refused} does not apply to {name} (its constructor takes no such keyword)")


def patch_grid(name: str) -> bool:
    """Whether `name`'s patch_size cuts the image into a ViT's token grid (ours, timm's ViTs) rather
    than setting a patchify stem's stride (ConvNeXt's), which `fitting_stem` fits to the image."""
    if name.startswith("kvit"):
        return True
    takes = constructor(name)
    return "patch_size" in takes and "img_size" in takes


def model_kwargs(cfg: TrainConfig, spec: CompetitionSpec) -> dict[str, Any]:
    """Keyword arguments for timm.create_model: the competition's shape plus the config's choices."""
    _known_model(cfg.model)
    kwargs: dict[str, Any] = dict(
        num_classes=spec.num_classes, in_chans=spec.channels, img_size=(spec.height, spec.width),
        drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
        **cfg.model_overrides(),
    )
    if not cfg.model.startswith("kvit"):
        kwargs = _timm_kwargs(cfg, spec, kwargs)
    patch = kwargs.get("patch_size")
    if patch is not None and (spec.height % patch or spec.width % patch):
        raise KaggleVitError(f"patch_size {patch} does not divide {spec.height}x{spec.width}; use one of {spec.patch_sizes()}")
    return kwargs


def _timm_kwargs(cfg: TrainConfig, spec: CompetitionSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords a timm model's constructor takes (a CNN: no image or patch size), with a patch
    size fitted to the image; a setting the model has no keyword for is refused, not ignored."""
    check_settings(cfg.model, [*cfg.model_overrides(), *(k for k in DROPOUTS if getattr(cfg, k))])
    takes = constructor(cfg.model)
    kwargs = {k: v for k, v in kwargs.items() if k in takes}
    if cfg.pretrained:  # the weights fix the patch size and the image size (images are resized to it)
        if "patch_size" in kwargs:
            raise KaggleVitError(f"pretrained: {cfg.model} keeps the patch size of its weights; "
                                 f"drop patch_size {kwargs['patch_size']}")
        kwargs.pop("img_size", None)
        return kwargs
    # the model's config says the competition's shape, so that no image is resized to ImageNet's 224
    kwargs["pretrained_cfg_overlay"] = {"input_size": (spec.channels, spec.height, spec.width)}
    if patch_grid(cfg.model):
        kwargs.setdefault("patch_size", fitting_patch_size(spec))
    elif "patch_size" in takes and "patch_size" not in kwargs:  # a patchify stem (ConvNeXt's)
        stem = fitting_stem(cfg.model, spec, takes["patch_size"])
        if stem is not None:
            kwargs["patch_size"] = stem
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
