"""Where a fold's training batches come from, one epoch after another, built once per fold.

Two sources with one interface (`set_epoch(seed, rows)`, iteration over `(x, y, rows)`, `len`):
- `DeviceBatches`: the uint8 training images live on the device (a GPU), and each batch is
  gathered, warped (`augment.augment_on_device`) and normalised there, so the host only launches
  work and never waits for data;
- `HostBatches`: albumentations on the host through one DataLoader kept for the whole fold (its
  worker processes persist across epochs), for CPUs and for image sets too large for the device.

Either way a batch's images and augmentation depend only on the epoch's seed and the batch's
place in the epoch, never on how many loader workers drew them. An epoch may train on some rows
only (`skip_easy_rows`: InfoBatch's pruning of rows the model already fits); each batch carries
its row numbers, so the loop can record every row's loss.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import TrainConfig
from . import ddp
from .augment import aug_ranges, augment_on_device, train_transform
from .dataset import ImageDataset, keep_batch

# At most this share of the device's free memory holds the training images (the rest is the model's).
DEVICE_SHARE = 0.25


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """DataLoader workers: the config's; else on CUDA one per spare core, and on a CPU with two
    cores none (a worker there competes with training: measured slower)."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cores = os.cpu_count() or 2
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 0 if cores <= 2 else min(4, cores // 4)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (a last, short batch is dropped), except that fewer rows than one batch
    make one batch."""
    return n // batch_size if n > batch_size else min(n, 1)


def whole_batch(n: int, batch_size: int) -> int:
    """Rows in each whole batch of an epoch of `n` rows (`batches_per_epoch`: full batches, or one of all n)."""
    return min(n, batch_size)


def skips_rows(epoch: int, cfg: TrainConfig) -> bool:
    """Whether epoch `epoch` (from 1) may leave easy rows out: with `skip_easy` on, every epoch but
    the first (no losses yet) and the last (InfoBatch's annealing: the model ends on every row)."""
    return cfg.skip_easy > 0 and 1 < epoch < cfg.epochs


# With `skip_easy`, the share of a fold's training rows whose loss is below the mean (those a middle
# epoch may leave out) before epochs 2, 3, 4 and 5 on, as measured on digit-recognizer
# (docs/training.md): it depends on how far the model has trained, not on the schedule's length.
EASY_SHARES = (0.67, 0.81, 0.87, 0.93)


def easy_share(epoch: int) -> float:
    """The expected share of rows below the mean loss before epoch `epoch` (2 or later)."""
    return EASY_SHARES[min(epoch - 2, len(EASY_SHARES) - 1)]


def skip_easy_rows(row_loss: torch.Tensor, ratio: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoBatch (Qin et al., ICLR 2024): each row whose last training loss is below the mean is left
    out of the epoch with probability `ratio`, and the easy rows kept weigh 1 / (1 - ratio), so the
    epoch's expected gradient is the full epoch's at a fraction of its steps. Returns the kept rows
    (ascending) and every row's loss weight."""
    easy = row_loss < row_loss.mean()
    skip = easy & (torch.rand(row_loss.shape, generator=gen, device=row_loss.device) < ratio)
    weights = torch.where(easy, 1.0 / (1.0 - ratio), 1.0).to(row_loss.dtype)
    return torch.nonzero(~skip).squeeze(1), weights


class SeededBatch(list):
    """A batch's row indices, with the seed its augmentation draws from (it travels to loader workers)
    and, under data parallelism, where this rank's share starts in the whole batch (`offset`)."""

    def __init__(self, indices: list[int], seed: int, offset: int = 0):
        super().__init__(indices)
        self.seed, self.offset = seed, offset


class EpochBatchSampler(Sampler[SeededBatch]):
    """Shuffled batches of row indices (of every row, or of the epoch's `rows`); the order and every
    batch's seed follow from `set_epoch`. Under data parallelism each batch is this rank's share of
    the whole batch (`ddp.share`): together the ranks see exactly the rows one process sees."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size, self.seed, self.rows = n, batch_size, 0, None

    def set_epoch(self, seed: int, rows: torch.Tensor | None = None) -> None:
        self.seed, self.rows = seed, rows

    def __len__(self) -> int:
        return batches_per_epoch(self.n if self.rows is None else len(self.rows), self.batch_size)

    def __iter__(self) -> Iterator[SeededBatch]:
        n = self.n if self.rows is None else len(self.rows)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        order = (order if self.rows is None else self.rows.cpu()[order]).tolist()
        for i in range(len(self)):
            whole = order[i * self.batch_size : (i + 1) * self.batch_size]
            part = ddp.share(len(whole))
            yield SeededBatch(whole[part], (self.seed * 100_003 + i) % 2**31, part.start)


def _loader_worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


class HostBatches:
    """Augmented (albumentations), normalised batches from one DataLoader that lives as long as the fold."""

    def __init__(self, dataset: ImageDataset, cfg: TrainConfig, device: torch.device):
        workers = loader_workers(cfg, device)
        transform = train_transform(cfg, seed=cfg.seed, size=tuple(dataset.images.shape[-2:]))
        self.sampler = EpochBatchSampler(len(dataset), cfg.batch_size)
        self.loader = DataLoader(dataset.with_augmentation(transform, cfg.aug_group), batch_sampler=self.sampler,
                                 collate_fn=keep_batch, num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                 worker_init_fn=_loader_worker_init if workers else None)

    def set_epoch(self, seed: int, rows: torch.Tensor | None = None) -> None:
        self.sampler.set_epoch(seed, rows)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def whole_batch(self) -> int:
        """Rows in each step's whole batch, over all ranks (`step_weight`)."""
        return whole_batch(self.sampler.n if self.sampler.rows is None else len(self.sampler.rows), self.sampler.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # The sampler repeats its order from the seed, so a second pass names each batch's rows.
        for (x, y), rows in zip(self.loader, self.sampler):
            yield x, y, torch.as_tensor(rows)


class DeviceBatches:
    """The training images kept on `device` as uint8; each batch gathered, warped and normalised there."""

    def __init__(self, dataset: ImageDataset, cfg: TrainConfig, device: torch.device):
        on = dataset.to_device(device)  # the fold's rows only, in order
        self.images, self.labels = on.images, on.labels.to(device)
        self.data_config, self.ranges, self.batch_size = dataset.data_config, aug_ranges(cfg), cfg.batch_size
        self.gen, self.rows = torch.Generator(device=device), None

    def set_epoch(self, seed: int, rows: torch.Tensor | None = None) -> None:
        self.gen.manual_seed(seed)
        self.rows = rows

    def __len__(self) -> int:
        return batches_per_epoch(len(self.images) if self.rows is None else len(self.rows), self.batch_size)

    @property
    def whole_batch(self) -> int:
        """Rows in each step's whole batch, over all ranks (`step_weight`)."""
        return whole_batch(len(self.images) if self.rows is None else len(self.rows), self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.images) if self.rows is None else len(self.rows)
        order = torch.randperm(n, generator=self.gen, device=self.images.device)
        if self.rows is not None:
            order = self.rows.to(order.device)[order]
        for i in range(len(self)):
            whole = order[i * self.batch_size : (i + 1) * self.batch_size]
            part = ddp.share(len(whole))  # this rank's share; every rank draws the whole batch's warps
            rows = whole[part]
            images = augment_on_device(self.images[rows], self.ranges, self.gen, part, len(whole))
            yield self.data_config.prepare(images), self.labels[rows], rows


def fits_on_device(dataset: ImageDataset, device: torch.device) -> bool:
    """Whether the dataset's images take at most DEVICE_SHARE of the GPU's free memory (never for a CPU)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return dataset.nbytes <= DEVICE_SHARE * free


def on_device(cfg: TrainConfig, dataset: ImageDataset, device: torch.device) -> bool:
    """Whether training batches are built on the device: `data_on_device` on/off, or auto (when they fit on a GPU)."""
    return cfg.data_on_device == "on" or (cfg.data_on_device == "auto" and fits_on_device(dataset, device))


def train_batches(dataset: ImageDataset, cfg: TrainConfig, device: torch.device) -> DeviceBatches | HostBatches:
    """The fold's source of training batches (see the module's docstring)."""
    return (DeviceBatches if on_device(cfg, dataset, device) else HostBatches)(dataset, cfg, device)
