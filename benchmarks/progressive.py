"""Probe behind README's progressive-resizing rows: fold 1 with its first epochs trained at a lower
resolution, then at full size (not a kaggle-vit feature: it did not pay).

    python benchmarks/progressive.py '{"epochs": 7, "low_epochs": 3, "low_size": 20}'

Wraps `benchmarks/fold1.py`: in training, during the first `low_epochs` epochs, each batch is
resized to `low_size` pixels (bilinear, antialiased) and the position embedding is resampled to the
smaller patch grid, as timm resamples it for another image size; validation stays at full size.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import kaggle_vit.train.engine as engine
from kaggle_vit.models.vit import KaggleViT

sys.path.insert(0, str(Path(__file__).parent))
import fold1  # noqa: E402 - the probe this one wraps

_epoch = {"now": 0}


def _low_res_tokens(low_epochs: int, size: int):
    """KaggleViT._tokens that, in training during the first `low_epochs` epochs, sees a resized batch."""
    full = KaggleViT._tokens

    def tokens(self: KaggleViT, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _epoch["now"] <= low_epochs):
            return full(self, x)
        x = self.patch_embed(self.stem(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)))
        grid = tuple(x.shape[-2:])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        return self.pos_drop(x + resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=self.grid_size,
                                                        num_prefix_tokens=1))
    return tokens


def _counting(train_one_epoch):
    def counted(t, batches, epoch, progress):
        _epoch["now"] = epoch
        return train_one_epoch(t, batches, epoch, progress)
    return counted


if __name__ == "__main__":
    overrides = json.loads(sys.argv[1])
    KaggleViT._tokens = _low_res_tokens(overrides.pop("low_epochs"), overrides.pop("low_size"))
    engine.train_one_epoch = _counting(engine.train_one_epoch)
    fold1.main(overrides)
