"""Where and in what precision a model runs: the device, and the autocast policy of training and
prediction (bf16 where the GPU has it, fp16 with a GradScaler where it does not, fp32 on a CPU);
which devices a run's folds are spread over, and how many folds train at once."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import KaggleVitError
from ..notices import notice

# torch.compile's GPU code generator (Triton) needs CUDA capability 7.0 or newer: not a P100 (6.0).
TRITON_MIN_CAPABILITY = (7, 0)
# One fold's training steps on images this small leave a GPU with this many multiprocessors
# (A100, H100, H200) mostly idle, and several folds at once keep it busy (benchmarks/RESULTS.md,
# "The GPU path, measured"); Kaggle's T4 and P100 have far fewer, and keep one fold each.
SHARED_GPU_MIN_SMS = 100
SHARED_GPU_MAX_PIXELS = 64 * 64


def select_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KaggleVitError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def gpu_multiprocessors(devices: list[str]) -> list[int]:
    """Streaming multiprocessors of each GPU in `devices`: how much parallel work one needs to be busy."""
    return [torch.cuda.get_device_properties(torch.device(d)).multi_processor_count for d in devices]


def shares_gpus(pixels: int, multiprocessors: list[int]) -> bool:
    """Whether one fold of `pixels`-pixel images cannot fill these GPUs, so that several folds
    should share each: small images on GPUs that are all large."""
    return pixels <= SHARED_GPU_MAX_PIXELS and min(multiprocessors) >= SHARED_GPU_MIN_SMS


def visible_devices(cfg: TrainConfig, gpu_count: int | None = None) -> list[str]:
    """The devices folds are spread over: ["cpu"] on a CPU; the one GPU that `--device cuda:N`
    names; else `devices` (all visible GPUs, or indices such as "0,1"). `gpu_count` overrides
    asking CUDA (for tests)."""
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if cfg.device == "cpu" or (cfg.device == "auto" and count == 0):
        return ["cpu"]
    if cfg.device.startswith("cuda:"):
        return [cfg.device]
    if cfg.devices == "all":
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    wanted = [int(part) for part in cfg.devices.split(",")]  # checked by config.validate_config
    bad = [i for i in wanted if not 0 <= i < count]
    if bad:
        raise KaggleVitError(f"devices {cfg.devices}: GPU {bad[0]} is not visible ({count} GPU(s) are: 0..{count - 1})")
    return [f"cuda:{i}" for i in dict.fromkeys(wanted)]


def auto_jobs(cfg: TrainConfig, devices: list[str], folds_to_run: int, pixels: int,
              multiprocessors: list[int] | None = None, cores: int | None = None) -> int:
    """How many folds to train at once: `cfg.jobs` when set; 2 on a CPU with 2+ cores; one per GPU,
    or all the folds when one fold of these `pixels`-pixel images cannot fill the GPUs
    (`shares_gpus`), with a worker per two cores at most (one issues its kernels, one
    compiles and feeds it). `multiprocessors` and `cores` override asking the machine (for tests)."""
    if cfg.jobs > 0:
        return min(cfg.jobs, max(1, folds_to_run))
    cores = cores or os.cpu_count() or 1
    if devices == ["cpu"]:
        return 2 if cores >= 2 and folds_to_run > 1 else 1
    jobs = len(devices)
    if shares_gpus(pixels, multiprocessors if multiprocessors is not None else gpu_multiprocessors(devices)):
        jobs = max(jobs, min(folds_to_run, cores // 2))
        if jobs > len(devices):
            notice(f"{jobs} folds train at once on {len(devices)} GPU(s): one fold of images this small cannot "
                   f"fill them (--jobs 1: one fold at a time)")
    return max(1, min(jobs, folds_to_run))


@dataclass(frozen=True)
class Amp:
    """Autocast settings: dtype None means full precision."""

    dtype: torch.dtype | None
    scaler: bool

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")


def has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 in hardware: CUDA capability 8.0 or newer (A100, H100), or
    ROCm. Not `torch.cuda.is_bf16_supported()`, which also says yes where bf16 is only emulated,
    slowly (T4, P100), because a bf16 tensor can be created there."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def amp_for(mode: str, device: torch.device, bf16_supported: bool | None = None) -> Amp:
    """auto: bf16 on CUDA that computes in it; fp16 with a GradScaler on CUDA that does not (T4,
    P100), whose attention softmax stays in float32 (fused kernels, and `models.vit.Attention`);
    off on a CPU (slower there). `bf16_supported` overrides asking the device (for tests)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return Amp(None, False)
    if mode == "auto":
        if bf16_supported is None:
            bf16_supported = has_native_bf16(device)
        mode = "bf16" if bf16_supported else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return Amp(dtype, dtype == torch.float16 and device.type == "cuda")


def can_compile(device: torch.device) -> bool:
    """Whether `torch.compile` can generate code for `device`: any CPU, and CUDA GPUs that Triton
    supports. Kaggle's P100 is older, and compiling there fails at the first step; where it cannot,
    this says once that the model runs eager (callers asked for compilation)."""
    if device.type != "cuda":
        return True
    capability = torch.cuda.get_device_capability(device)
    if capability >= TRITON_MIN_CAPABILITY:
        return True
    _notice_eager(torch.cuda.get_device_name(device), capability)
    return False


@functools.lru_cache(maxsize=None)
def _notice_eager(name: str, capability: tuple[int, int]) -> None:
    """Say once per process and GPU kind that compilation was asked for and skipped."""
    notice(f"compile skipped: {name} has CUDA capability {capability[0]}.{capability[1]}, and torch.compile "
           f"(Triton) needs {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} or newer; the model runs eager")


@functools.lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (Linux /proc/cpuinfo; False where unknown)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def inference_amp(mode: str, device: torch.device) -> Amp:
    """Autocast for prediction: as for training, except that `auto` on a CPU with AMX predicts in
    bf16, measured faster than fp32 there (where training in bf16 was slower, so it stays fp32)."""
    if mode == "auto" and device.type == "cpu" and cpu_has_amx():
        return Amp(torch.bfloat16, False)
    return amp_for(mode, device)


def autocast(device: torch.device, amp: Amp):
    """The autocast context for `amp` (a no-op when off)."""
    return torch.autocast(device.type, dtype=amp.dtype or torch.float32, enabled=amp.dtype is not None)
