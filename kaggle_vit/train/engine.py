"""The one training loop: optimiser, schedule, `train_one_epoch` and `evaluate`, the training state
that makes a fold resumable, prediction with test-time views (device and AMP policy: `device`).

`fit` runs the epochs for `cv` and (through `cv`) for `tune`; tuning hooks in through `on_epoch`.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..errors import KaggleVitError
from ..io import atomic_path
from ..metrics import Metric, get_metric
from ..records import EpochRecord, FoldResult, to_json
from . import ddp
from .augment import tta_views
from .batches import DeviceBatches, HostBatches, skip_easy_rows, skips_rows, train_batches
from .dataset import ImageDataset
from .device import Amp, amp_for, autocast, can_compile, inference_amp, select_device
from .distill import Teacher, distill_loss


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters: 5% more training images/s on the CPU than the
    per-parameter loop, measured); biases, norms, position embedding and class token are not decayed.
    With `layer_decay`, timm's layer-wise groups (BEiT) instead: `_layer_groups`."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if cfg.layer_decay:
        groups = _layer_groups(model, cfg, skip)
    else:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True)


def _layer_groups(model: nn.Module, cfg: TrainConfig, skip: set[str]) -> list[dict]:
    """timm's `param_groups_layer_decay`, by the model's `group_matcher`: the head learns at lr, and
    each layer below it (block, then stem and embeddings) at layer_decay times the one above. Each
    group's lr is set to its scaled value here, because LambdaLR scales each group's initial lr:
    the ratios so hold at every step of the schedule."""
    if not hasattr(model, "group_matcher"):
        raise KaggleVitError(f"layer_decay: timm cannot group {cfg.model}'s parameters by depth (it has no "
                             f"group_matcher); set layer_decay=0")
    groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    return groups


class WarmupCosine:
    """The learning-rate factor at an optimiser step: linear warm-up, then cosine decay to zero over
    cfg.epochs, read from how far through the epochs the step is. An epoch that trains on fewer rows
    (`skip_easy`) so keeps its place in the schedule; with equal epochs the position is the step
    itself. A callable object, so LambdaLR's state saves and restores where the epochs stand."""

    def __init__(self, epochs: int, warmup_epochs: float, steps_per_epoch: int):
        self.unit = steps_per_epoch  # a full epoch's steps: the schedule's unit
        self.total = max(1, epochs * steps_per_epoch)
        self.warm = min(self.total - 1, int(warmup_epochs * steps_per_epoch))
        self.epoch_index, self.epoch_start, self.epoch_steps = 0, 0, steps_per_epoch

    def begin_epoch(self, epoch: int, start_step: int, steps: int) -> None:
        """Epoch `epoch` (from 1) starts at optimiser step `start_step` and takes `steps` steps."""
        self.epoch_index, self.epoch_start, self.epoch_steps = epoch - 1, start_step, max(1, steps)

    def __call__(self, step: int) -> float:
        position = self.epoch_index * self.unit + (step - self.epoch_start) * self.unit / self.epoch_steps
        if position < self.warm:
            return (position + 1) / self.warm
        return 0.5 * (1 + math.cos(math.pi * (position - self.warm) / max(1, self.total - self.warm)))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero, stepped every batch (`WarmupCosine`)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.epochs, cfg.warmup_epochs, steps_per_epoch))


class Progress(Protocol):
    """What training tells a progress display (rich in the CLI, nothing in tests)."""

    def start_fold(self, fold: int, folds: int) -> None: ...
    def end_fold(self, summary: FoldResult) -> None: ...
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float | None, images: int) -> None: ...
    def end_epoch(self, record: EpochRecord) -> None: ...


class NoProgress:
    def start_fold(self, fold: int, folds: int) -> None: ...
    def end_fold(self, summary: FoldResult) -> None: ...
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float | None, images: int) -> None: ...
    def end_epoch(self, record: EpochRecord) -> None: ...


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, so a model's initial weights and a CPU run repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def maybe_compile(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """`torch.compile(model)` when cfg.compile and `device` can compile, else the model itself (see
    benchmarks/RESULTS.md for what it gains); the compiled code is cached, so later folds of a run
    reuse it."""
    return torch.compile(model, mode=cfg.compile_mode) if cfg.compile and can_compile(device) else model


def _batches(dataset: ImageDataset, batch_size: int, device: torch.device, pad: bool):
    """(normalised float batch on `device`, real count) pairs in order, without augmentation; with
    `pad` the last batch is padded to full size, so a compiled model sees one shape and never
    recompiles. Each batch reads only its rows (`ImageDataset.span`), from the host or the device."""
    for start in range(0, len(dataset), batch_size):
        chunk = dataset.span(start, start + batch_size)
        n = len(chunk)
        if pad and n < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n,) + tuple(chunk.shape[1:]))])
        yield dataset.data_config.prepare(chunk.to(device, non_blocking=True)), n


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: ImageDataset, device: torch.device, amp: Amp, batch_size: int = 256,
                   pad: bool = False) -> torch.Tensor:
    """Logits for a dataset's images, batched, in eval mode, as float32 on the CPU (copied once, at the
    end). Under data parallelism each rank predicts its share of the rows and every rank gets them all."""
    model.eval()
    outs = []
    for x, n in _batches(dataset.part(ddp.share(len(dataset))), batch_size, device, pad):
        with autocast(device, amp):
            outs.append(model(x)[:n].float().clone())  # a CUDA-graph output is overwritten by the next batch
    return ddp.gather_rows(torch.cat(outs).cpu())


@torch.no_grad()
def predict_probs(model: nn.Module, dataset: ImageDataset, device: torch.device, amp: Amp, batch_size: int = 256,
                  views: int = 1, pad: bool = False, mode: str = "shift", plain: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities averaged over `views` test-time views (`augment.tta_views`: one-pixel
    shifts, or mirror images for photos), float32 (N, classes). cv uses it for both the OOF and the
    test predictions, so the OOF score measures the predictor the submission uses. `plain`: the
    first (plain) view's probabilities when already known, as a fold's validation gives them, so
    that view is not computed twice. Under data parallelism each rank predicts its share of the rows
    and every rank gets them all."""
    model.eval()
    share = ddp.share(len(dataset))
    transforms, outs, start = tta_views(mode, views), [], share.start
    for x, n in _batches(dataset.part(share), batch_size, device, pad):
        total = 0
        for i, view in enumerate(transforms):
            if i == 0 and plain is not None:
                total = total + torch.from_numpy(plain[start : start + n]).to(device)
                continue
            with autocast(device, amp):
                total = total + model(view(x))[:n].float().softmax(1)
        outs.append(total / len(transforms))
        start += n
    return ddp.gather_rows(torch.cat(outs).cpu()).numpy()


@dataclass
class FitResult:
    """History of every epoch and the best epoch's weights and validation probabilities."""

    history: list[EpochRecord]
    best_epoch: int
    best_state: dict
    valid_probs: np.ndarray
    train_seconds: float
    amp: str


@dataclass
class _State:
    epoch: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = -1
    best_state: dict | None = None
    best_probs: np.ndarray | None = None
    seconds: float = 0.0


def _numpy_rng() -> dict:
    """NumPy's global generator state as tensors and numbers (what torch.load(weights_only=True) reads)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _save_state(path: Path, t: Trainer, st: _State) -> None:
    """The training state after an epoch, as tensors and plain values only (read back weights-only)."""
    state = {**st.__dict__, "history": [to_json(record) for record in st.history],
             "best_probs": None if st.best_probs is None else torch.from_numpy(st.best_probs)}
    payload = {"model": t.model.state_dict(), "opt": t.opt.state_dict(), "sched": t.sched.state_dict(),
               "scaler": t.scaler.state_dict(), "state": state,
               "ema": None if t.ema is None else t.ema.module.state_dict(),
               "row_loss": None if t.row_loss is None else t.row_loss.cpu(),
               "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng(), "python": random.getstate(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save(payload, fh)
        except RuntimeError as error:  # a failed write (a full disk) surfaces as torch's end-of-archive error
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None  # atomic_path names the file
            raise


STATE_KEYS = ("model", "opt", "sched", "scaler", "state", "rng")


def read_state(path: Path) -> dict:
    """A training state saved by `fit`, read weights-only (tensors and plain values: a crafted file
    runs nothing); raises (whatever torch.load raises) when it is damaged, crafted or from an older
    kaggle-vit."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in STATE_KEYS if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise ValueError(f"no '{missing[0]}' entry")
    return payload


def _restore(payload: dict, t: Trainer) -> _State:
    t.model.load_state_dict(payload["model"])
    t.opt.load_state_dict(payload["opt"])
    t.sched.load_state_dict(payload["sched"])
    t.scaler.load_state_dict(payload["scaler"])
    if t.ema is not None:
        if payload.get("ema") is None:
            raise KaggleVitError("the saved training state has no weight average; delete it to retrain the fold with ema")
        t.ema.module.load_state_dict(payload["ema"])
    if t.row_loss is not None:
        if payload.get("row_loss") is None:
            raise KaggleVitError("the saved training state has no row losses; delete it to retrain the fold with skip_easy")
        t.row_loss.copy_(payload["row_loss"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    numpy = rng["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = payload["state"]
    return _State(**{**state, "history": [EpochRecord.from_json(record) for record in state["history"]],
                      "best_probs": None if state["best_probs"] is None else state["best_probs"].numpy()})


def _check_finite(value: float, what: str, epoch: int) -> None:
    if not math.isfinite(value):
        raise KaggleVitError(f"epoch {epoch}: the {what} became {value}; lower lr, or set amp to bf16 or off")


@dataclass
class Trainer:
    """What a training step needs besides the batch: the model (and its compiled forward), the
    optimiser, the schedule, the gradient scaler, autocast and the config; with `skip_easy`, every
    training row's last loss and the loss weights of the epoch's rows; with mixup or cutmix, timm's
    Mixup; with a teacher, its model."""

    model: nn.Module
    forward: nn.Module
    evaluator: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: Amp
    device: torch.device
    cfg: TrainConfig
    ema: ModelEmaV3 | None = None
    row_loss: torch.Tensor | None = None
    row_weight: torch.Tensor | None = None
    mixup: Mixup | None = None
    teacher: Teacher | None = None
    row_mine: torch.Tensor | None = None

    @property
    def eval_model(self) -> nn.Module:
        """The weights validated and kept: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def make_ema(model: nn.Module, decay: float) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of the weights (decay 0: none). Its warm-up makes the average at step k a plain
    mean of the first k steps' weights until `decay` caps it, so the random initial weights fade at once."""
    if not decay:
        return None
    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=1.0)


def make_mixup(cfg: TrainConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup of cfg's mixup, cutmix and mixup_* settings (mixup and cutmix 0: none); the label
    smoothing goes into its soft targets."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                 mode=cfg.mixup_mode, label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def mix(mixup: Mixup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mix the batch's images in place and return their soft targets (rows sum to 1). Mixup pairs
    rows, so an odd batch's last row stays as it is, with its own (smoothed) one-hot target."""
    even = len(y) - len(y) % 2
    target = mixup_target(y, mixup.num_classes, smoothing=mixup.label_smoothing)
    if even:
        target[:even] = mixup(x[:even], y[:even])[1]
    return target


def make_trainer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int, rows: int = 0,
                 teacher: Teacher | None = None) -> Trainer:
    """The model moved to cfg's device, with its optimiser, schedule, scaler, AMP, (compiled)
    forward and Mixup; with cfg.skip_easy, a loss per training row (`rows` of them) to choose epochs'
    rows by; the `teacher`, if any, frozen on the same device. Under data parallelism the training
    forward is DistributedDataParallel's (gradients averaged over the ranks); evaluation uses the model itself."""
    device = select_device(cfg.device)
    amp = amp_for(cfg.amp, device)
    model.to(device)
    if ddp.active() and device.type == "cuda":  # batch statistics over the whole batch, as one process has them
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.scaler)
    row_loss = torch.zeros(rows, device=device) if cfg.skip_easy and rows else None
    evaluator = maybe_compile(model, cfg, device)
    forward = evaluator
    if ddp.active():
        forward = maybe_compile(DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None),
                                cfg, device)
    return Trainer(model, forward, evaluator, opt, sched, scaler, amp, device, cfg, make_ema(model, cfg.ema),
                   row_loss, mixup=make_mixup(cfg, model.num_classes),
                   teacher=None if teacher is None else teacher.to(device),
                   row_mine=None if row_loss is None or not ddp.active() else torch.zeros_like(row_loss))


def _loss(t: Trainer, x: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
          rows: torch.Tensor | None) -> torch.Tensor:
    """The batch's mean cross-entropy against its labels, smoothed, or against mixup's soft targets
    (rows of class probabilities, smoothed already: timm's SoftTargetCrossEntropy), mixed with the
    teacher's loss on the same (mixed) images when there is a teacher; with row losses kept
    (`skip_easy`), each row's loss is recorded (on the device: no wait) and weighted as the epoch's rows say."""
    smoothing = t.cfg.label_smoothing if target.ndim == 1 else 0.0
    if t.teacher is None and (t.row_loss is None or rows is None):
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    losses = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")
    if t.teacher is not None:
        taught = distill_loss(logits.float(), t.teacher.logits(x), t.teacher.kind, t.teacher.temperature)
        losses = (1 - t.teacher.alpha) * losses + t.teacher.alpha * taught
    if t.row_loss is None or rows is None:
        return losses.mean()
    t.row_loss[rows] = losses.detach().float()
    if t.row_mine is not None:
        t.row_mine[rows] = 1.0
    return losses.mean() if t.row_weight is None else (losses * t.row_weight[rows]).mean()


def share_row_losses(t: Trainer) -> None:
    """Under data parallelism, every rank's row losses of the epoch given to every rank (each rank
    recorded only its own rows'), so all ranks choose the same rows next epoch."""
    if t.row_mine is None:
        return
    losses, mine = ddp.all_sum(t.row_loss * t.row_mine), ddp.all_sum(t.row_mine)
    t.row_loss.copy_(torch.where(mine > 0, losses, t.row_loss))
    t.row_mine.zero_()


def train_one_epoch(t: Trainer, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], epoch: int,
                    progress: Progress) -> dict:
    """One pass over the training batches (images, labels, and their row numbers or None), mixed on
    the device when mixup or cutmix is on (so both batch sources get it); returns the epoch's mean
    loss and accuracy. The sums stay on the device and are read once, at the end: a
    read per step would make the host wait for the GPU at every step. On a CPU, where a read costs
    nothing, the display also gets each step's loss. Under data parallelism each rank's batch is its
    share of the step's whole batch, weighted so that DDP's mean of the ranks' gradients is the
    whole batch's (`step_weight`), and the epoch's sums are added up over the ranks."""
    t.model.train()
    whole = getattr(batches, "whole_batch", 0)
    loss_sum = torch.zeros((), device=t.device)
    correct = torch.zeros((), dtype=torch.long, device=t.device)
    seen, show_loss = 0, t.device.type == "cpu"
    for x, y, rows in batches:
        x, y = x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)
        rows = None if rows is None else rows.to(t.device, non_blocking=True)
        target = y if t.mixup is None else mix(t.mixup, x, y)
        with autocast(t.device, t.amp):
            logits = t.forward(x)
            loss = _loss(t, x, logits, target, rows)
        t.opt.zero_grad(set_to_none=True)
        t.scaler.scale(loss if whole == 0 or not ddp.active() else loss * step_weight(len(y), whole)).backward()
        t.scaler.unscale_(t.opt)
        nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip, foreach=True)
        t.scaler.step(t.opt)
        t.scaler.update()
        t.sched.step()
        if t.ema is not None:
            t.ema.update(t.model, step=t.sched.last_epoch)
        n = len(y)
        loss_sum += loss.detach().float() * n
        # A mixed row counts as right when the model names its target's largest share: the dominant image's label.
        correct += (logits.argmax(1) == (target if target.ndim == 1 else target.argmax(1))).sum()
        seen += n
        progress.step(loss.item() if show_loss else None, n)
    if ddp.active():
        sums = ddp.all_sum(torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=t.device,
                                                                                            dtype=torch.float64)]))
        loss_sum, correct, seen = sums[0], sums[1], int(sums[2].item())
    mean_loss = loss_sum.item() / max(1, seen)
    _check_finite(mean_loss, "loss", epoch)
    return {"train_loss": mean_loss, "train_acc": correct.item() / max(1, seen), "seen": seen}


def step_weight(rows: int, whole: int) -> float:
    """What a rank's mean loss over its `rows` of a step's `whole` batch is scaled by, so that the mean
    of the ranks' gradients (DDP's) is the gradient of the whole batch's mean loss, whatever the shares."""
    return rows * ddp.world() / whole


def evaluate(forward: nn.Module, dataset: ImageDataset, device: torch.device, amp: Amp, batch_size: int, pad: bool,
             epoch: int) -> tuple[dict, torch.Tensor]:
    """Validation loss and accuracy of the plain images (no test-time views: the best epoch is chosen
    on these), and the logits; a non-finite loss stops the fold."""
    logits = predict_logits(forward, dataset, device, amp, batch_size, pad=pad)
    labels = dataset.labels
    scores = {"valid_loss": F.cross_entropy(logits, labels).item(),
              "valid_acc": (logits.argmax(1) == labels).float().mean().item()}
    _check_finite(scores["valid_loss"], "validation loss", epoch)
    return scores, logits


def validates(epoch: int, cfg: TrainConfig) -> bool:
    """Whether epoch `epoch` (from 1) is validated: every `valid_every`-th (none when 0) and always the
    last, so a fold always has a best epoch; fewer validations leave more of a CPU's time for training."""
    return epoch == cfg.epochs or (cfg.valid_every > 0 and epoch % cfg.valid_every == 0)


def _on_device(dataset: ImageDataset, batches: DeviceBatches | HostBatches, device: torch.device) -> ImageDataset:
    """The validation images on the device too when the training images are (one copy, not one per epoch)."""
    return dataset.to_device(device) if isinstance(batches, DeviceBatches) else dataset


def _epoch_rows(t: Trainer, seed: int, epoch: int) -> torch.Tensor | None:
    """The rows epoch `epoch` trains on: every row (None, unweighted) unless it is one that skips rows
    (`batches.skips_rows`), and then `batches.skip_easy_rows` of the rows' last losses."""
    t.row_weight = None
    if t.row_loss is None or not skips_rows(epoch, t.cfg):
        return None
    gen = torch.Generator(device=t.row_loss.device).manual_seed(seed)
    rows, t.row_weight = skip_easy_rows(t.row_loss, t.cfg.skip_easy, gen)
    return rows


def fit(
    model: nn.Module,
    train: ImageDataset,
    valid: ImageDataset,
    cfg: TrainConfig,
    seed: int,
    state_path: Path | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    resume: dict | None = None,
    metric: Metric | None = None,
    stop_after: int | None = None,
    teacher: Teacher | None = None,
) -> FitResult:
    """Train on `train` for cfg.epochs, validating on `valid` as `validates` says and keeping the
    validated epoch best by the competition's `metric` (default accuracy; the datasets carry the
    images, labels and the model's normalisation). Each epoch's state is saved to `state_path`;
    `resume` (a state from `read_state`) continues after its last epoch. `stop_after` ends the run
    after that epoch (the schedule still spans cfg.epochs), so another process can resume it from
    `state_path`. A `teacher` adds its distillation loss to every step's."""
    progress = progress or NoProgress()
    metric = metric or get_metric("accuracy")
    device = select_device(cfg.device)
    eval_amp = inference_amp(cfg.amp, device)
    model.to(device)
    seed_everything(seed)
    batches = train_batches(train, cfg, device)
    valid = _on_device(valid, batches, device)
    t = make_trainer(model, cfg, max(1, len(batches)), rows=len(train), teacher=teacher)
    st = _State() if resume is None else _restore(resume, t)
    eval_forward = t.evaluator if t.ema is None else maybe_compile(t.ema.module, cfg, device)
    last = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    while st.epoch < last:
        epoch = st.epoch + 1
        t0 = time.perf_counter()
        epoch_seed = seed * 1000 + epoch
        batches.set_epoch(epoch_seed, _epoch_rows(t, epoch_seed, epoch))
        t.sched.lr_lambdas[0].begin_epoch(epoch, t.sched.last_epoch, len(batches))
        progress.start_epoch(epoch, cfg.epochs, len(batches))
        trained = train_one_epoch(t, batches, epoch, progress)
        share_row_losses(t)
        train_time = time.perf_counter() - t0
        probs, scores = None, dict.fromkeys(("valid_loss", "valid_acc", "valid_score"), math.nan)
        if validates(epoch, cfg):
            scores, logits = evaluate(eval_forward, valid, device, eval_amp, cfg.eval_batch_size, cfg.compile, epoch)
            probs = logits.softmax(1).numpy()
            scores["valid_score"] = metric(valid.labels.numpy(), probs)
        record = EpochRecord(epoch=epoch, train_loss=trained["train_loss"], train_acc=trained["train_acc"], **scores,
                             lr=max(g["lr"] for g in t.opt.param_groups), seconds=time.perf_counter() - t0,
                             images=trained["seen"], images_per_s=trained["seen"] / train_time)
        st.history.append(record)
        st.seconds += record.seconds
        st.epoch = epoch
        if probs is not None and metric.better(record.valid_score, st.best_score):
            st.best_score, st.best_epoch = record.valid_score, epoch
            st.best_state = {k: v.detach().cpu().clone() for k, v in t.eval_model.state_dict().items()}
            st.best_probs = probs
        progress.end_epoch(record)
        if state_path is not None and ddp.is_main():  # one writer; every rank resumes from it
            _save_state(state_path, t, st)
        if on_epoch is not None:
            on_epoch(record)
    return FitResult(st.history, st.best_epoch, st.best_state, st.best_probs, st.seconds, t.amp.name)
