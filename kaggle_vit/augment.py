"""Training augmentation (albumentations, from TrainConfig) and test-time views (whole batches, in
torch), chosen per competition: rotation and one-pixel shifts for digits, flips and crops for photos."""
from __future__ import annotations

from typing import Callable

import albumentations as A
import cv2
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .errors import KaggleVitError


def _affine(cfg: TrainConfig) -> A.Affine:
    return A.Affine(rotate=(-cfg.rotate, cfg.rotate), scale=(1 - cfg.scale, 1 + cfg.scale),
                    translate_percent=(-cfg.shift, cfg.shift), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)


def train_transform(cfg: TrainConfig, seed: int | None = None, size: tuple[int, int] = (28, 28)) -> A.Compose | None:
    """The training augmentation for uint8 (H, W, C) images of `size`, or None for `aug = none`:
    rotate (digits: ±rotate°, never flipped), affine (+ scale and shift), flip (photos: a
    horizontal flip and shift-scale-rotate), crop (photos: random resized crop and a flip)."""
    ops = {
        "none": None,
        "rotate": lambda: [A.Rotate(limit=cfg.rotate, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)],
        "affine": lambda: [_affine(cfg)],
        "flip": lambda: [A.HorizontalFlip(p=0.5), _affine(cfg)],
        "crop": lambda: [A.RandomResizedCrop(size=size, scale=(0.35, 1.0), p=1.0), A.HorizontalFlip(p=0.5)],
    }
    if cfg.aug not in ops:
        raise KaggleVitError(f"aug must be one of {', '.join(ops)}, got '{cfg.aug}'")
    return None if ops[cfg.aug] is None else A.Compose(ops[cfg.aug](), seed=seed)


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


def tta_views(mode: str, views: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """`views` functions of a batch, the plain batch first: one-pixel shifts (`shift`, digits) or
    mirror images and their shifts (`flip`, photos)."""
    if mode == "shift":
        return [lambda x, dx=dx, dy=dy: shift(x, dx, dy) for dx, dy in tta_shifts(views)]
    if mode == "flip":
        tta_shifts(views)  # the same range check
        return [lambda x, m=m, dx=dx, dy=dy: shift(x.flip(-1) if m else x, dx, dy) for m, dx, dy in TTA_FLIPS[:views]]
    raise KaggleVitError(f"tta_mode must be shift or flip, got '{mode}'")


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """A batch (B, C, H, W) moved dx pixels right and dy down, the border repeated into the gap
    (for digits on black, a black border)."""
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
