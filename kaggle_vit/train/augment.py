"""Training augmentation and test-time views, chosen per competition: rotation and one-pixel shifts
for digits, flips and crops for photos. Training augmentation has one set of ranges (`AugRanges`)
and two implementations: albumentations per image group on the host (CPU, image files), and
whole batches warped on the device (`augment_on_device`, GPU); test-time views act on whole batches."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import albumentations as A
import cv2
import torch
import torch.nn.functional as F

from ..config import TrainConfig, TtaMode
from ..errors import KaggleVitError


@dataclass(frozen=True)
class AugRanges:
    """The random ranges of one training augmentation. The albumentations pipeline (CPU and image
    files) and the batched on-device one (GPU) are both built from these, so they draw from the
    same distributions: rotation uniform in ±rotate degrees, each axis scaled by 1 ± scale and moved
    by ± shift of its size, a horizontal mirror with probability `flip`, or (crop) a random crop of
    `crop_area` of the image with aspect ratio in `crop_ratio`, resized back."""

    rotate: float = 0.0
    scale: float = 0.0
    shift: float = 0.0
    flip: float = 0.0
    crop_area: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


def aug_ranges(cfg: TrainConfig) -> AugRanges | None:
    """The ranges of `cfg.aug` (None for `none`): rotate (digits, never flipped), affine (+ scale and
    shift), flip (photos: a mirror and the affine), crop (photos: random resized crop and a mirror)."""
    affine = AugRanges(rotate=cfg.rotate, scale=cfg.scale, shift=cfg.shift)
    ranges = {"none": None, "rotate": AugRanges(rotate=cfg.rotate), "affine": affine,
              "flip": dataclasses.replace(affine, flip=0.5), "crop": AugRanges(flip=0.5, crop_area=(0.35, 1.0))}
    return ranges[cfg.aug]


def train_transform(cfg: TrainConfig, seed: int | None = None, size: tuple[int, int] = (28, 28)) -> A.Compose | None:
    """The albumentations pipeline of `aug_ranges(cfg)` for uint8 (H, W, C) images of `size`, or None."""
    r = aug_ranges(cfg)
    if r is None:
        return None
    border = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
    if r.crop_area is not None:
        ops = [A.RandomResizedCrop(size=size, scale=r.crop_area, ratio=r.crop_ratio, p=1.0)]
    elif r.scale == 0 and r.shift == 0:
        ops = [A.Rotate(limit=r.rotate, **border)]
    else:
        ops = [A.Affine(rotate=(-r.rotate, r.rotate), scale=(1 - r.scale, 1 + r.scale),
                        translate_percent=(-r.shift, r.shift), **border)]
    if r.flip:
        ops.insert(len(ops) if r.crop_area is not None else 0, A.HorizontalFlip(p=r.flip))
    return A.Compose(ops, seed=seed)


def sample_params(r: AugRanges, n: int, size: tuple[int, int], gen: torch.Generator,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """`n` random draws from `r` for images of `size`: mirror (±1) and either the affine's angle
    (degrees), scales and shift (whole pixels, truncated toward zero as albumentations does), or
    the crop window's size and centre offset (pixels)."""
    h, w = size
    draw = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen, device=device)  # noqa: E731
    mirror = torch.where(draw(0, 1) < r.flip, -1.0, 1.0)
    if r.crop_area is not None:
        area = draw(*r.crop_area) * h * w
        ratio = torch.exp(draw(math.log(r.crop_ratio[0]), math.log(r.crop_ratio[1])))
        cw, ch = (area * ratio).sqrt().clamp(max=w), (area / ratio).sqrt().clamp(max=h)
        return {"mirror": mirror, "cw": cw, "ch": ch, "cx": (w - cw) * draw(-0.5, 0.5), "cy": (h - ch) * draw(-0.5, 0.5)}
    return {"mirror": mirror, "angle": draw(-r.rotate, r.rotate), "sx": draw(1 - r.scale, 1 + r.scale),
            "sy": draw(1 - r.scale, 1 + r.scale), "tx": (draw(-r.shift, r.shift) * w).trunc(),
            "ty": (draw(-r.shift, r.shift) * h).trunc()}


def sample_warps(r: AugRanges, n: int, size: tuple[int, int], gen: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """`n` random warps drawn from `r`, as (n, 2, 3) matrices mapping each output pixel to the
    input pixel it reads (centred pixel coordinates, y down), for `warp`."""
    p = sample_params(r, n, size, gen, device)
    if r.crop_area is None:
        return affine_warps(**p)
    h, w = size  # output → (mirror) → the crop window of the input
    zero = torch.zeros_like(p["cw"])
    linear = torch.stack([torch.stack([p["cw"] / w * p["mirror"], zero], -1), torch.stack([zero, p["ch"] / h], -1)], -2)
    return torch.cat([linear, torch.stack([p["cx"], p["cy"]], -1)[..., None]], -1)


def affine_warps(mirror: torch.Tensor, angle: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, tx: torch.Tensor,
                 ty: torch.Tensor) -> torch.Tensor:
    """The inverse of albumentations' forward affine (mirror x by `mirror` = ±1, scale, rotate by
    `angle` degrees about the centre, move by (tx, ty) pixels) as `warp` matrices (n, 2, 3)."""
    a = torch.deg2rad(angle)
    cos, sin = a.cos(), a.sin()
    linear = torch.stack([torch.stack([mirror * cos / sx, -mirror * sin / sx], -1),
                          torch.stack([sin / sy, cos / sy], -1)], -2)
    offset = -(linear @ torch.stack([tx, ty], -1)[..., None])
    return torch.cat([linear, offset], -1)


def warp(images: torch.Tensor, warps: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) resampled (bilinear, black outside) through `sample_warps`'s matrices,
    as float pixel values: a whole batch in one `grid_sample`."""
    b, c, h, w = images.shape
    norm = torch.tensor([w / 2, h / 2], device=images.device, dtype=warps.dtype)
    theta = torch.cat([warps[..., :2] * norm[None, None, :] / norm[None, :, None],
                       warps[..., 2:] / norm[None, :, None]], -1)
    grid = F.affine_grid(theta, (b, c, h, w), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_on_device(images: torch.Tensor, r: AugRanges | None, gen: torch.Generator,
                      part: slice | None = None, total: int = 0) -> torch.Tensor:
    """A batch of uint8 images augmented where they are (GPU), each image its own draw; float pixels.
    With `part`, `images` are that part of a batch of `total`: the whole batch's warps are drawn (the
    generator advances as for the whole batch) and the part's applied, as a data-parallel rank does."""
    if r is None:
        return images.float()
    size = tuple(images.shape[-2:])
    if part is None:
        return warp(images, sample_warps(r, len(images), size, gen, images.device))
    return warp(images, sample_warps(r, total, size, gen, images.device)[part])


# One-pixel shifts in the order TTA adds them: right, left, down, up, then the diagonals.
TTA_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))
# Photos: the image and its mirror, then each of them shifted by a pixel.
TTA_FLIPS: tuple[tuple[bool, int, int], ...] = ((False, 0, 0), (True, 0, 0), (False, 1, 0), (True, 1, 0),
                                               (False, -1, 0), (True, -1, 0), (False, 0, 1), (True, 0, 1), (False, 0, -1))


def tta_shifts(views: int) -> list[tuple[int, int]]:
    """The (dx, dy) pixel shifts of `views` test-time views, the unshifted image first (1 to 9)."""
    if not 1 <= views <= len(TTA_SHIFTS):
        raise KaggleVitError(f"tta must be 1 to {len(TTA_SHIFTS)} views, got {views}")
    return list(TTA_SHIFTS[:views])


def tta_views(mode: TtaMode, views: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """`views` functions of a batch, the plain batch first: one-pixel shifts (`shift`, digits) or
    mirror images and their shifts (`flip`, photos)."""
    if mode == "flip":
        tta_shifts(views)  # the same range check
        return [lambda x, m=m, dx=dx, dy=dy: shift(x.flip(-1) if m else x, dx, dy) for m, dx, dy in TTA_FLIPS[:views]]
    return [lambda x, dx=dx, dy=dy: shift(x, dx, dy) for dx, dy in tta_shifts(views)]


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """A batch (B, C, H, W) moved dx pixels right and dy down, the border repeated into the gap
    (for digits on black, a black border)."""
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
