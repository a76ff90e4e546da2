"""Throughput, measured side by side: our ViT against timm's VisionTransformer of the same shape,
the data pipeline against the training step, and cv's real training loop against the bare step. Rounds alternate between the contenders so a
noisy machine slows both alike; medians are reported."""
from __future__ import annotations

import contextlib
import itertools
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .train.batches import DeviceBatches, loader_workers, train_batches
from .train.dataset import ImageDataset, resolve_data_config
from .train.device import amp_for, autocast, inference_amp, select_device
from .train.engine import NoProgress, make_optimizer, make_trainer, train_one_epoch


@dataclass(frozen=True)
class BenchRow:
    """Median images per second of one contender in one mode."""

    name: str
    mode: str
    images_per_s: float
    runs: int


def timm_twin(model: nn.Module) -> nn.Module:
    """timm's VisionTransformer with our model's image size, patch, width, depth, heads, MLP ratio and
    stochastic depth (the regularisers cost time too, so both pay for the same ones)."""
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.embed_dim
    return timm.models.vision_transformer.VisionTransformer(
        img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans, num_classes=model.num_classes,
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
        mlp_ratio=mlp_ratio, qkv_bias=True, drop_path_rate=model.drop_path_rate)


def _train_step(model, opt, x, y, device, amp):
    with autocast(device, amp):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _timed(fn, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_models(models: dict[str, nn.Module], cfg: TrainConfig, rounds: int = 5, steps: int = 10) -> list[BenchRow]:
    """Training and inference images/s of each model, rounds interleaved, each mode in the autocast
    cv uses for it (inference in bf16 on a CPU with AMX, training in fp32 there)."""
    device = select_device(cfg.device)
    amp, eval_amp = amp_for(cfg.amp, device), inference_amp(cfg.amp, device)
    shape = next(iter(models.values())).img_size
    chans = next(iter(models.values())).in_chans
    x = torch.randn(cfg.batch_size, chans, *shape, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    xe = torch.randn(cfg.eval_batch_size, chans, *shape, device=device)
    opts = {n: make_optimizer(m.to(device), cfg) for n, m in models.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, model in models.items():
            model.train()
            t_train = _timed(lambda: _train_step(model, opts[name], x, y, device, amp), steps, device)
            model.eval()
            with torch.no_grad(), autocast(device, eval_amp):
                t_eval = _timed(lambda: model(xe), max(1, steps // 4), device)
            if r:
                times.setdefault((name, "train"), []).append(steps * cfg.batch_size / t_train)
                times.setdefault((name, "infer"), []).append(max(1, steps // 4) * cfg.eval_batch_size / t_eval)
    return [BenchRow(n, m, statistics.median(v), len(v)) for (n, m), v in times.items()]


def bench_data(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, batches: int = 50, rounds: int = 3) -> BenchRow:
    """images/s of the training input pipeline alone, as cv builds it: on the device (uint8 images
    there, warped in batches) or on the host (albumentations, DataLoader)."""
    device = select_device(cfg.device)
    source = train_batches(ImageDataset(images, labels), cfg, device)
    rates = []
    for r in range(rounds + 1):  # round 0 starts loader workers / warms up
        source.set_epoch(r)
        seen, t0 = 0, time.perf_counter()
        for x, _, _ in itertools.islice(source, batches):
            seen += len(x)
        _sync(device)
        if r:
            rates.append(seen / (time.perf_counter() - t0))
    where = "on device" if isinstance(source, DeviceBatches) else f"albumentations, {loader_workers(cfg, device)} workers"
    return BenchRow(f"data pipeline ({where}, aug {cfg.aug})", "load", statistics.median(rates), rounds)


class GpuSampler:
    """Mean GPU utilisation (NVML, `nvidia-ml-py`) sampled in a thread while its block runs; None
    on a CPU or without NVML."""

    def __init__(self, device: torch.device, every: float = 0.05):
        self.device, self.every, self.samples, self._stop = device, every, [], threading.Event()
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml  # lazy: optional (nvidia-ml-py), and only on a GPU

                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            except Exception:  # noqa: BLE001 - no NVML (package or driver): utilisation is not reported
                self.handle = None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(self._read())

    def __enter__(self) -> "GpuSampler":
        if self.handle is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


@dataclass(frozen=True)
class LoopBench:
    """The bare training step (random data already on the device: the ceiling) against cv's real
    loop (data, augmentation, the same step), at the same batch size, and the GPU's utilisation."""

    bare: BenchRow
    loop: BenchRow
    gpu_utilization: float | None

    @property
    def ratio(self) -> float:
        return self.loop.images_per_s / self.bare.images_per_s


def bench_loop(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, steps: int = 40,
               rounds: int = 3) -> LoopBench:
    """images/s of `engine.train_one_epoch` fed by random batches already on the device, and fed by
    the real training batches (`batches.train_batches`), rounds interleaved; both run the model as
    cv does (AMP, compiled when cfg.compile; round 0 compiles and warms up)."""
    device = select_device(cfg.device)
    dataset = ImageDataset(images, labels, data_config=resolve_data_config(model))
    source = train_batches(dataset, cfg, device)
    t = make_trainer(model, cfg, steps_per_epoch=len(source))
    x = torch.randn(cfg.batch_size, *images.shape[1:], device=device)
    y = torch.randint(0, int(labels.max()) + 1, (cfg.batch_size,), device=device)
    rates: dict[str, list[float]] = {"bare": [], "loop": []}
    sampler = GpuSampler(device)
    for r in range(rounds + 1):
        source.set_epoch(r)
        for name, batches in (("bare", [(x, y, None)] * steps), ("loop", itertools.islice(source, steps))):
            with sampler if (r and name == "loop") else contextlib.nullcontext():
                t0 = time.perf_counter()
                seen = train_one_epoch(t, batches, epoch=r, progress=NoProgress())["seen"]
                if r:
                    rates[name].append(seen / (time.perf_counter() - t0))
    rows = {n: BenchRow("bare training step" if n == "bare" else "cv training loop", "train", statistics.median(v), len(v))
            for n, v in rates.items()}
    return LoopBench(rows["bare"], rows["loop"], sampler.mean)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
