"""Albumentations pipelines from TrainConfig: rotation (default ±10°), optional scale/shift, never flips."""
from __future__ import annotations

import albumentations as A
import cv2

from .config import TrainConfig


def train_transform(cfg: TrainConfig, seed: int | None = None) -> A.Compose | None:
    """The training augmentation for uint8 (H, W, C) images, or None for `aug = none`."""
    if cfg.aug == "none":
        return None
    if cfg.aug == "rotate":
        op = A.Rotate(limit=cfg.rotate, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
    else:
        op = A.Affine(
            rotate=(-cfg.rotate, cfg.rotate),
            scale=(1 - cfg.scale, 1 + cfg.scale),
            translate_percent=(-cfg.shift, cfg.shift),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=1.0,
        )
    return A.Compose([op], seed=seed)


def rotation_transform(degrees: float) -> A.Compose:
    """A fixed rotation by `degrees`, for test-time augmentation."""
    return A.Compose([A.Affine(rotate=(degrees, degrees), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)])
