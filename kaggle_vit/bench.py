"""Throughput, measured side by side: our ViT against timm's VisionTransformer of the same shape,
and the data pipeline against the training step. Rounds alternate between the contenders so a
noisy machine slows both alike; medians are reported."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .engine import amp_for, autocast, inference_amp, make_optimizer, select_device, train_loader
from .dataset import ImageDataset


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
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
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
    """images/s of the training input pipeline alone: cached uint8 → albumentations → batch."""
    device = select_device(cfg.device)
    rates = []
    for r in range(rounds):
        loader = train_loader(ImageDataset(images, labels), cfg, epoch_seed=r, device=device)
        seen, t0 = 0, time.perf_counter()
        for i, (x, _) in enumerate(loader):
            seen += len(x)
            if i + 1 == batches:
                break
        rates.append(seen / (time.perf_counter() - t0))
    return BenchRow(f"data pipeline (aug {cfg.aug}, {cfg.num_workers if cfg.num_workers >= 0 else 'auto'} workers)",
                    "load", statistics.median(rates), rounds)
