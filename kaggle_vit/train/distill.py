"""Distillation (DeiT, Touvron et al. 2021): the student also learns from a finished model's
predictions on the very batch it trains on (augmented, mixed), softly (KL of temperature-softened
probabilities) or hard (the teacher's top class as a label).

The teacher is a frozen model in eval mode; it sees the batch in its own input form (its mean, std
and size), converted from the student's, so a CNN with ImageNet statistics can teach a kvit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dataset import DataConfig, per_channel


@dataclass
class Teacher:
    """A frozen model and how it reads the student's input; `kind`, `alpha` and `temperature` shape the loss."""

    model: nn.Module
    student: DataConfig
    own: DataConfig
    kind: str = "hard"
    alpha: float = 0.5
    temperature: float = 1.0

    def to(self, device: torch.device) -> "Teacher":
        """The teacher on `device`, frozen and in eval mode."""
        self.model.to(device).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits for a batch in the student's input form."""
        return self.model(convert(x, self.student, self.own)).float()


def convert(x: torch.Tensor, src: DataConfig, dst: DataConfig) -> torch.Tensor:
    """A batch normalised as `src` says, renormalised (and resized) as `dst` wants it."""
    channels = x.shape[1]
    if (src.mean, src.std) != (dst.mean, dst.std):
        def column(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(per_channel(values, channels), device=x.device, dtype=x.dtype).view(1, channels, 1, 1)

        x = (x * column(src.std) + column(src.mean) - column(dst.mean)) / column(dst.std)
    size = tuple(dst.input_size[-2:])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """Per-row distillation loss: KL(teacher ‖ student) of the temperature's probabilities, times T²
    so its gradients keep their scale (Hinton et al. 2015), or cross-entropy against the teacher's top class."""
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(1), reduction="none")
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="none",
                    log_target=True).sum(1) * (t * t)
