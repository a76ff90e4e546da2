"""The torch side of the data: uint8 images → float batches, with albumentations augmentation.

Kept apart from `data` (reading and validating files) so that commands which only read files
(`kaggle-vit data`) never import torch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 scaled to [-1, 1]."""
    return images.float().mul_(1.0 / 127.5).sub_(1.0)


Transform = Callable[..., dict]


class ImageDataset(Dataset):
    """uint8 (N, C, H, W) images → float tensors in [-1, 1], with labels when given.

    `__getitems__` builds a whole batch at once (one stack, one scale), so a DataLoader built with
    `collate_fn=keep_batch` has no per-item collation overhead. An albumentations `transform`
    sees uint8 (H, W, C) arrays, as it expects: each image alone (`group=1`), or `group` images
    stacked as channels that share one random draw, which makes augmentation ~7× faster on the CPU.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, transform: Transform | None = None,
                 group: int = 1):
        self.images = images
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.group = max(1, group)

    def __len__(self) -> int:
        return len(self.images)

    def _batch_uint8(self, indices: list[int]) -> torch.Tensor:
        batch = self.images[np.asarray(indices)]
        if self.transform is not None:
            batch = np.concatenate([self._augment(batch[i : i + self.group]) for i in range(0, len(batch), self.group)])
        return torch.from_numpy(np.ascontiguousarray(batch))

    def _augment(self, images: np.ndarray) -> np.ndarray:
        """One albumentations call for a group of (G, C, H, W) images stacked as G*C channels: they
        share one random draw, and the per-call overhead is paid once per group."""
        g, c, h, w = images.shape
        stacked = np.ascontiguousarray(images.reshape(g * c, h, w).transpose(1, 2, 0))
        out = self.transform(image=stacked)["image"].reshape(h, w, g * c)
        return out.transpose(2, 0, 1).reshape(g, c, h, w)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        x = to_float(self._batch_uint8(indices))
        if self.labels is None:
            return (x,)
        return x, self.labels[torch.as_tensor(indices)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.__getitems__([index]))


def keep_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """DataLoader collate for ImageDataset: the batch is already built."""
    return batch
