"""The torch side of the data: uint8 images → float batches, with albumentations augmentation.

Kept apart from the `data` layer (reading and validating files) so that commands which only read
files (`kaggle-vit data`) never import torch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config as timm_resolve
from torch import nn
from torch.utils.data import Dataset


def per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """A model's per-channel numbers for `channels` inputs (one value is shared; RGB numbers for a
    grey model are averaged)."""
    if len(values) == channels:
        return tuple(values)
    return (sum(values) / len(values),) * channels


@dataclass(frozen=True)
class DataConfig:
    """How a model wants its input, as timm's `resolve_data_config` gives it: input size, and the
    per-channel mean and std of pixels scaled to 0..1 (our kvit models: 0.5 and 0.5, so [-1, 1])."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bilinear"

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) → the model's input: float32 (x / 255 - mean) / std, in one multiply
        and one subtract, resized to `input_size` when the images have another size (pretrained
        weights keep the size they were trained at; augmentation ran before, at the images' size)."""
        channels = images.shape[1]
        mean, std = per_channel(self.mean, channels), per_channel(self.std, channels)
        if len(set(mean)) == 1 and len(set(std)) == 1:
            x = images.float().mul_(1.0 / (255.0 * std[0])).sub_(mean[0] / std[0])
        else:
            scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, channels, 1, 1)
            shift = torch.tensor([m / s for m, s in zip(mean, std)], device=images.device).view(1, channels, 1, 1)
            x = images.float().mul_(scale).sub_(shift)
        size = tuple(self.input_size[-2:])
        if tuple(x.shape[-2:]) == size:
            return x
        mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _built_input(model: nn.Module, cfg_size: tuple[int, ...]) -> tuple[int, int, int]:
    """The (C, H, W) the model was built for (kvit: `in_chans`, `img_size`; timm ViTs: their patch
    embedding's; CNNs: their first convolution's channels), where the pretrained config may still say
    what the weights were trained on."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(model, "img_size", None) or getattr(embed, "img_size", None)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # a ViT's: its patch embedding
    chans = getattr(model, "in_chans", None) or getattr(first, "in_channels", None) or cfg_size[0]
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        size = cfg_size[-2:]
    return int(chans), int(size[0]), int(size[1])


def resolve_data_config(model: nn.Module) -> DataConfig:
    """The data config of a model: mean, std and interpolation of its (pretrained) config, as timm's
    `resolve_data_config` gives them, and the image size it was built for."""
    found = timm_resolve({}, model=model)
    return DataConfig(_built_input(model, tuple(found["input_size"])), tuple(found["mean"]), tuple(found["std"]),
                      str(found.get("interpolation", "bilinear")))


Transform = Callable[..., dict]


def group_seed(seed: int, position: int) -> int:
    """The augmentation seed of the group of images that starts at `position` of a batch seeded
    `seed`: a data-parallel rank holding part of the batch draws what one process would."""
    return (seed + 7919 * position) % 2**31


# Rows copied to the device at a time: the host never holds more than this many bytes of them.
DEVICE_CHUNK_BYTES = 64 << 20


class ImageDataset(Dataset):
    """uint8 (N, C, H, W) images → float tensors normalised as the model wants (`DataConfig`;
    default [-1, 1]), with labels when given.

    The images stay where they are: `images` is a whole array (a memory-mapped cache, or a tensor on
    the device) and `rows` the rows of it this dataset holds, in order (all when None); `extra` a
    second array and its rows, after them (a fold's pseudo-labelled test rows). `labels` has one
    label per row of the dataset. A batch reads only its own rows, so a fold never copies its images.

    `__getitems__` builds a whole batch at once (one stack, one scale), so a DataLoader built with
    `collate_fn=keep_batch` has no per-item collation overhead. An albumentations `transform`
    sees uint8 (H, W, C) arrays, as it expects: each image alone (`group=1`), or `group` images
    stacked as channels that share one random draw, which makes augmentation ~7× faster on the CPU.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None,
                 transform: Transform | None = None, group: int = 1, data_config: DataConfig | None = None,
                 rows: np.ndarray | None = None, extra: tuple[np.ndarray, np.ndarray] | None = None):
        self.images, self.rows, self.extra = images, rows, extra
        self.data_config = data_config or DataConfig(tuple(images.shape[1:]))
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.group = max(1, group)

    def _own(self) -> int:
        """How many of the dataset's rows come from `images` (the rest from `extra`)."""
        return len(self.images) if self.rows is None else len(self.rows)

    def __len__(self) -> int:
        return self._own() + (0 if self.extra is None else len(self.extra[1]))

    @property
    def nbytes(self) -> int:
        """The size of the dataset's images, wherever they are."""
        return len(self) * self.images[:1].nbytes

    def part(self, rows: slice) -> ImageDataset:
        """The dataset's rows `rows` (a data-parallel rank's share), nothing copied; itself when that is all of them."""
        if rows.start == 0 and rows.stop >= len(self):
            return self
        if self.extra is not None:
            raise ValueError("a part of a dataset with extra rows")
        labels = None if self.labels is None else self.labels[rows]
        if self.rows is None:
            return ImageDataset(self.images[rows], labels, self.transform, self.group, self.data_config)
        return ImageDataset(self.images, labels, self.transform, self.group, self.data_config, self.rows[rows])

    def with_augmentation(self, transform: Transform | None, group: int) -> ImageDataset:
        """The same images, labels and normalisation with another augmentation (a fresh draw per epoch)."""
        return ImageDataset(self.images, self.labels, transform, group, self.data_config, self.rows, self.extra)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """The uint8 images of the dataset's rows `indices`, in that order: only these rows are read."""
        indices, own = np.asarray(indices, dtype=np.int64), self._own()
        mine = indices if self.extra is None else indices[indices < own]
        taken = self.images[mine if self.rows is None else self.rows[mine]]
        if self.extra is None:
            return taken
        more, more_rows = self.extra
        out = np.empty((len(indices), *self.images.shape[1:]), dtype=self.images.dtype)
        out[indices < own] = taken
        out[indices >= own] = more[more_rows[indices[indices >= own] - own]]
        return out

    def span(self, start: int, stop: int) -> torch.Tensor:
        """uint8 images of the dataset's rows start..stop, as a tensor: a view of the array when the
        dataset is a whole array (nothing copied), else those rows gathered."""
        if self.rows is None and self.extra is None:
            part = self.images[start:stop]
            return part if isinstance(part, torch.Tensor) else torch.from_numpy(part)
        return torch.from_numpy(self.gather(np.arange(start, min(stop, len(self)))))

    def to_device(self, device: torch.device) -> ImageDataset:
        """The dataset's rows copied to `device`, in order, as one uint8 tensor (a GPU keeps its training
        and validation images), a chunk at a time so the host never holds them all."""
        images = torch.empty((len(self), *self.images.shape[1:]), dtype=torch.uint8, device=device)
        step = max(1, DEVICE_CHUNK_BYTES // max(1, self.images[:1].nbytes))
        for start in range(0, len(self), step):
            images[start : start + step] = self.span(start, start + step).to(device)
        return ImageDataset(images, self.labels, self.transform, self.group, self.data_config)

    def _batch_uint8(self, indices: list[int]) -> torch.Tensor:
        batch = self.gather(indices)
        if self.transform is not None:
            seed, offset = getattr(indices, "seed", None), getattr(indices, "offset", 0)  # batches.SeededBatch
            groups = []
            for i in range(0, len(batch), self.group):
                if seed is not None:  # each group's draw follows from its place in the whole batch
                    g = group_seed(seed, offset + i)  # one generator pair for the pipeline: a quarter of set_random_seed's cost
                    self.transform.set_random_state(np.random.Generator(np.random.PCG64(g)), random.Random(g))
                groups.append(self._augment(batch[i : i + self.group]))
            batch = np.concatenate(groups)
        return torch.from_numpy(np.ascontiguousarray(batch))

    def _augment(self, images: np.ndarray) -> np.ndarray:
        """One albumentations call for a group of (G, C, H, W) images stacked as G*C channels: they
        share one random draw, and the per-call overhead is paid once per group."""
        g, c, h, w = images.shape
        stacked = np.ascontiguousarray(images.reshape(g * c, h, w).transpose(1, 2, 0))
        out = self.transform(image=stacked)["image"].reshape(h, w, g * c)
        return out.transpose(2, 0, 1).reshape(g, c, h, w)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        x = self.data_config.prepare(self._batch_uint8(indices))
        if self.labels is None:
            return (x,)
        return x, self.labels[torch.as_tensor(indices)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.__getitems__([index]))


def keep_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """DataLoader collate for ImageDataset: the batch is already built."""
    return batch
