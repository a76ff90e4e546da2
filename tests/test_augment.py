"""Augmentation and test-time views per competition: rotation and shifts for digits, flips and crops for photos."""
import numpy as np
import pytest
import torch

from kaggle_vit.augment import train_transform, tta_views
from kaggle_vit.config import TrainConfig, resolve_config
from kaggle_vit.dataset import ImageDataset
from kaggle_vit.errors import KaggleVitError


def _photo() -> np.ndarray:
    """An asymmetric 3-channel 'photo': a bright bar on the left only."""
    img = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    img[:, :, 4:28, 2:8] = 200
    return img


def test_flip_mirrors_about_half_the_images():
    images = np.repeat(_photo(), 200, axis=0)
    ds = ImageDataset(images, np.zeros(200, dtype=np.int64), train_transform(TrainConfig(aug="flip", rotate=0, scale=0,
                                                                                          shift=0), seed=1, size=(32, 32)))
    x, _ = ds.__getitems__(list(range(200)))
    left, right = x[:, 0, :, :16].mean((1, 2)), x[:, 0, :, 16:].mean((1, 2))
    mirrored = (right > left).float().mean().item()
    assert 0.35 < mirrored < 0.65


def test_crop_keeps_the_size_and_changes_the_image():
    ds = ImageDataset(_photo(), np.zeros(1, dtype=np.int64), train_transform(TrainConfig(aug="crop"), seed=3, size=(32, 32)))
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and not torch.equal(x, ImageDataset(_photo())[0][0])


def test_flip_views_are_the_image_then_its_mirror():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    plain, mirror, *_ = tta_views("flip", 3)
    assert torch.equal(plain(x), x) and torch.equal(mirror(x), x.flip(-1))
    assert len(tta_views("shift", 5)) == 5
    with pytest.raises(KaggleVitError, match="tta_mode must be shift or flip"):
        tta_views("rotate", 2)


def test_a_spec_train_table_sets_the_competition_default(tmp_path):
    from kaggle_vit.competition import _bundled_dir

    spec = tmp_path / "photos.toml"
    spec.write_text((_bundled_dir() / "digit-recognizer.toml").read_text() + '\n[train]\naug = "flip"\ntta_mode = "flip"\n')
    cfg = resolve_config(competition=str(spec))
    assert (cfg.aug, cfg.tta_mode) == ("flip", "flip")
    assert resolve_config(competition=str(spec), aug="crop").aug == "crop"  # the command line still wins
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text().replace('tta_mode = "flip"', 'tta_mode = "rotate"'))
    with pytest.raises(KaggleVitError, match="tta_mode must be shift or flip"):
        resolve_config(competition=str(bad))
