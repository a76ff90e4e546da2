"""KaggleViT: a compact Vision Transformer for small images, registered with timm.

Conv patch embedding (optionally after a small conv stem), a class token, learned position
embeddings, pre-norm blocks of multi-head self-attention (fused `scaled_dot_product_attention`)
and an MLP, dropout and stochastic depth, and a linear head on the class token. Shared parts
(MLP, DropPath, initialisers) come from `timm.layers`, as in timm's own ViT.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from timm.models import adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _dropout(p: float) -> nn.Module:
    """Dropout, or nothing at all when p is 0 (one module call less per use in the training step)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Mlp(nn.Sequential):
    """fc1 → GELU → dropout → fc2 → dropout, the dropouts left out at rate 0 (timm's Mlp calls
    them, and its optional norm, regardless)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), _dropout(drop)
        self.fc2, self.drop2 = nn.Linear(hidden, dim), _dropout(drop)


class Attention(nn.Module):
    """Multi-head self-attention; fused kernel in training, explicit weights when asked for."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = _dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = None
        if return_attention:  # in float32 under any autocast: q·k overflows fp16's range long before softmax
            with torch.autocast(x.device.type, enabled=False):
                weights = ((q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)).softmax(dim=-1)
                x = (weights @ v.float()).to(v.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c))), weights

    def forward_class(self, x: torch.Tensor) -> torch.Tensor:
        """The output at the class token (B, 1, C) alone: its query attends to every key and value,
        as in `forward`, but no query, attention row or projection is computed for the patches."""
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        w, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:c], None if bias is None else bias[:c]).view(b, 1, h, d).transpose(1, 2)
        k, v = F.linear(x, w[c:], None if bias is None else bias[c:]).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, 1, c)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each with drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), weights

    def forward_class(self, x: torch.Tensor) -> torch.Tensor:
        """This block's output at the class token only, (B, 1, C): what a last block feeds a
        class-token head. Equal to `forward(x)[0][:, :1]` at about a quarter of the cost."""
        cls = x[:, :1] + self.drop_path(self.attn.forward_class(self.norm1(x)))
        return cls + self.drop_path(self.mlp(self.norm2(cls)))


def conv_stem(in_chans: int, channels: int, patch_size: int, pool: bool = False) -> tuple[nn.Module, int, int]:
    """3×3 conv + BN + GELU stages, one per factor of 2 in the patch size, doubling the channels at
    each, as in "Early convolutions help transformers see better" (Xiao et al., 2021); with `pool`
    each stage keeps stride 1 and ends in a 2×2 max-pool, as the conv tokenizer of CCT (Hassani et
    al., 2021). An odd patch size gets one stride-1 stage. Returns the stem, its output channels
    and the stride left for the patch convolution."""
    downs = (patch_size & -patch_size).bit_length() - 1  # how many times 2 divides the patch size
    layers, c_in, c_out = [], in_chans, channels
    for _ in range(max(1, downs)):
        stride = 2 if downs and not pool else 1
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
        if downs and pool:
            layers.append(nn.MaxPool2d(2))
        c_in, c_out = c_out, 2 * c_out
    return nn.Sequential(*layers), c_in, patch_size >> downs


class KaggleViT(nn.Module):
    """Vision Transformer for small images; hyper-parameters as keywords, timm-style."""

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        stem_channels: int = 0,
        stem_pool: bool = False,
        global_pool: str = "token",
    ):
        super().__init__()
        h, w = _pair(img_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the {h}x{w} image")
        self.img_size, self.patch_size, self.in_chans = (h, w), patch_size, in_chans
        self.num_classes, self.embed_dim, self.num_features = num_classes, embed_dim, embed_dim
        self.global_pool, self.drop_path_rate = global_pool, drop_path_rate
        self.grid_size = (h // patch_size, w // patch_size)
        self.stem, stem_out, rest = (conv_stem(in_chans, stem_channels, patch_size, stem_pool) if stem_channels
                                     else (nn.Identity(), in_chans, patch_size))
        self.patch_embed = nn.Conv2d(stem_out, embed_dim, rest, stride=rest)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dim))
        self.pos_drop = _dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, r) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Linear layers: truncated normal with std 1/√fan_in. timm's fixed 0.02 suits width 768; at
        width 64 it left the residual branches so small that a 12k-image epoch reached 69% instead
        of 87% (measured, see docs/models.md)."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW should not decay (timm's convention)."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameters by depth, as timm's ViT groups them (for layer-wise lr decay): the conv stem
        with the patch embedding, class token and position embedding first, then each block, the
        final norm with the last block; the head, unmatched, last."""
        return {"stem": r"^(?:stem|patch_embed|cls_token|pos_embed)",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head, e.g. to fine-tune on a competition with another class count."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Token features after the final norm: (B, 1 + patches, embed_dim)."""
        x = self._tokens(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. With the class-token head, the last block runs for the class token alone (the
        patches' outputs there would be discarded): the same logits as
        `forward_head(forward_features(x))` with the last block's MLP, projection and attention
        rows computed once instead of once per token."""
        if self.global_pool == "avg" or not len(self.blocks):
            return self.forward_head(self.forward_features(x))
        x = self._tokens(x)
        for block in self.blocks[:-1]:
            x, _ = block(x)
        return self.forward_head(self.norm(self.blocks[-1].forward_class(x)))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every block, each (B, heads, tokens, tokens), for visualisation."""
        x, maps = self._tokens(x), []
        for block in self.blocks:
            x, weights = block(x, return_attention=True)
            maps.append(weights)
        return maps


def _cfg(**overrides) -> dict:
    return {
        "url": "", "num_classes": 10, "input_size": (1, 28, 28), "fixed_input_size": True,
        "mean": (0.5,), "std": (0.5,), "interpolation": "bilinear", "crop_pct": 1.0,
        "first_conv": "patch_embed", "classifier": "head", "license": "mit", **overrides,
    }


# Defined above the registered functions: timm reads it when each is decorated.
default_cfgs = generate_default_cfgs({
    "kvit_pico_patch7_28.untrained": _cfg(),
    "kvit_pico_patch4_28.untrained": _cfg(),
    "kvit_nano_patch4_28.untrained": _cfg(),
    "kvit_tiny_patch4_28.untrained": _cfg(),
    "kvit_small_patch4_28.untrained": _cfg(),
    "kvit_base_patch4_28.untrained": _cfg(),
})


def _first_conv(model: KaggleViT) -> str:
    """The name of the convolution that sees the image: the stem's first, or the patch embedding."""
    return "stem.0" if isinstance(model.stem, nn.Sequential) else "patch_embed"


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: KaggleViT) -> dict[str, torch.Tensor]:
    """Fit a kvit state dict from another competition to `model`, as timm's ViT filter does: the
    position embedding resampled to the model's patch grid (bicubic, class token kept), and the first
    convolution adapted to the model's channel count (timm's `adapt_input_conv`). Anything else that
    differs is left for `load_state_dict` to refuse."""
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side != pos.shape[1] - 1:
            raise ValueError(f"pos_embed of {pos.shape[1] - 1} patches is not a square grid; cannot resample it")
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.grid_size), old_size=[side, side],
                                                  num_prefix_tokens=1)
    key = _first_conv(model) + ".weight"
    conv = out.get(key)
    if conv is not None and conv.ndim == 4 and conv.shape[1] != model.in_chans:
        out[key] = adapt_input_conv(model.in_chans, conv, base_chans=conv.shape[1])
    return out


def _create(variant: str, pretrained: bool, arch: dict, kwargs: dict) -> KaggleViT:
    """Build a registered variant: its architecture numbers, overridden by the caller's keywords.
    Weights exist only where the caller gives them (`pretrained_cfg_overlay` with a file or state
    dict, as kaggle-vit's `pretrained` setting does): kvit models are trained here, not downloaded."""
    return build_model_with_cfg(KaggleViT, variant, pretrained=pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**arch, **kwargs})


@register_model
def kvit_pico_patch7_28(pretrained: bool = False, **kwargs) -> KaggleViT:
    """A 4×4 patch grid (16 tokens), width 64, depth 4, 4 heads, one stride-1 conv stem stage of 16."""
    return _create("kvit_pico_patch7_28", pretrained, dict(patch_size=7, embed_dim=64, depth=4, num_heads=4, stem_channels=16), kwargs)


@register_model
def kvit_pico_patch4_28(pretrained: bool = False, **kwargs) -> KaggleViT:
    """The CPU default: a 7×7 patch grid (49 tokens) after a conv stem of 32 then 64 channels,
    width 64, depth 2, 2 heads, MLP ratio 2. Most accurate per CPU minute of those measured (benchmarks/RESULTS.md)."""
    return _create("kvit_pico_patch4_28", pretrained,
                   dict(patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, stem_channels=32), kwargs)


@register_model
def kvit_nano_patch4_28(pretrained: bool = False, **kwargs) -> KaggleViT:
    """Width 96, depth 6, 4 heads, conv stem of 24 channels."""
    return _create("kvit_nano_patch4_28", pretrained, dict(patch_size=4, embed_dim=96, depth=6, num_heads=4, stem_channels=24), kwargs)


@register_model
def kvit_tiny_patch4_28(pretrained: bool = False, **kwargs) -> KaggleViT:
    """Width 192, depth 6, 3 heads, conv stem of 32 channels."""
    return _create("kvit_tiny_patch4_28", pretrained, dict(patch_size=4, embed_dim=192, depth=6, num_heads=3, stem_channels=32), kwargs)


@register_model
def kvit_small_patch4_28(pretrained: bool = False, **kwargs) -> KaggleViT:
    """Width 256, depth 8, 8 heads, conv stem of 32 channels: a GPU model."""
    return _create("kvit_small_patch4_28", pretrained, dict(patch_size=4, embed_dim=256, depth=8, num_heads=8, stem_channels=32), kwargs)


@register_model
def kvit_base_patch4_28(pretrained: bool = False, **kwargs) -> KaggleViT:
    """Width 384, depth 9, 6 heads, conv stem of 48 channels: the most accurate, for GPUs."""
    return _create("kvit_base_patch4_28", pretrained, dict(patch_size=4, embed_dim=384, depth=9, num_heads=6, stem_channels=48), kwargs)
