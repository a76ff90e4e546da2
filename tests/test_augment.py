"""Augmentation and test-time views per competition: rotation and shifts for digits, flips and crops for photos."""
import numpy as np
import pytest
import torch

from kaggle_vit.config import TrainConfig
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.run.settings import resolve_config
from kaggle_vit.train.augment import (affine_warps, aug_ranges, augment_on_device, sample_params, train_transform,
                                      tta_views, warp)
from kaggle_vit.train.dataset import ImageDataset


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


def test_a_spec_train_table_sets_the_competition_default(tmp_path):
    from kaggle_vit.spec import bundled_dir

    spec = tmp_path / "photos.toml"
    spec.write_text((bundled_dir() / "digit-recognizer.toml").read_text() + '\n[train]\naug = "flip"\ntta_mode = "flip"\n')
    cfg = resolve_config(competition=str(spec))
    assert (cfg.aug, cfg.tta_mode) == ("flip", "flip")
    assert resolve_config(competition=str(spec), aug="crop").aug == "crop"  # the command line still wins
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text().replace('tta_mode = "flip"', 'tta_mode = "rotate"'))
    with pytest.raises(KaggleVitError, match=r"bad.toml \[train\]: tta_mode = 'rotate' must be one of shift, flip$"):
        resolve_config(competition=str(bad))


# --- the batched on-device augmentation (GPU path) against the albumentations one (CPU path) ---

def _albumentations_ranges(cfg: TrainConfig) -> dict[str, tuple[float, float]]:
    """The ranges the albumentations pipeline of `cfg` was built with, read back from its ops."""
    found = {"angle": (0.0, 0.0), "sx": (1.0, 1.0), "tx": (0.0, 0.0), "flip": 0.0}
    for op in train_transform(cfg).transforms:
        name = type(op).__name__
        if name == "Rotate":
            found["angle"] = tuple(op.limit)
        elif name == "Affine":
            found.update(angle=tuple(op.rotate), sx=tuple(op.scale["x"]), tx=tuple(op.translate_percent["x"]))
        elif name == "HorizontalFlip":
            found["flip"] = op.p
    return found


@pytest.mark.parametrize("aug", ["rotate", "affine", "flip"])
def test_device_draws_fill_the_albumentations_ranges(aug):
    cfg = TrainConfig(aug=aug, rotate=12.0, scale=0.15, shift=0.1)
    want = _albumentations_ranges(cfg)
    p = sample_params(aug_ranges(cfg), 20_000, (28, 28), torch.Generator().manual_seed(0), torch.device("cpu"))
    for name, key, unit in (("angle", "angle", 1.0), ("sx", "sx", 1.0), ("sy", "sx", 1.0), ("tx", "tx", 28.0), ("ty", "tx", 28.0)):
        lo, hi = (v * unit for v in want[key])
        if unit != 1.0:  # whole pixels, truncated toward zero, as albumentations moves images
            lo, hi = float(np.trunc(lo)), float(np.trunc(hi))
            assert set(p[name].unique().tolist()) <= set(np.arange(lo, hi + 1).tolist())
        got = p[name]
        tol = 0.01 * max(hi - lo, 1e-9)
        assert lo - 1e-6 <= got.min() <= lo + tol and hi - tol <= got.max() <= hi + 1e-6, (name, got.min(), got.max(), lo, hi)
    assert abs((p["mirror"] < 0).float().mean().item() - want["flip"]) < 0.02


def test_device_crops_follow_random_resized_crop():
    op = next(o for o in train_transform(TrainConfig(aug="crop"), size=(32, 32)).transforms if type(o).__name__ == "RandomResizedCrop")
    p = sample_params(aug_ranges(TrainConfig(aug="crop")), 20_000, (32, 32), torch.Generator().manual_seed(0), torch.device("cpu"))
    area = p["cw"] * p["ch"] / 32**2
    assert op.scale[0] - 1e-6 <= area.min() < op.scale[0] + 0.01 and area.max() <= 1 + 1e-6
    assert (p["cx"].abs() <= (32 - p["cw"]) / 2 + 1e-4).all() and abs((p["mirror"] < 0).float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("angle,scale,shift,mirror", [(30, 1.0, 0.0, False), (30, 1.1, 0.1, False), (-20, 0.9, -0.1, True)])
def test_device_warp_matches_albumentations_for_one_draw(mnist, angle, scale, shift, mirror):
    """The same draw gives the same image both ways (albumentations moves by whole pixels, so the
    shift here is a whole number of pixels)."""
    import albumentations as A
    import cv2

    digits = mnist[0][:16]
    ops = [A.Affine(rotate=(angle, angle), scale=(scale, scale), translate_percent=(shift, shift),
                    border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)]
    if mirror:
        ops.insert(0, A.HorizontalFlip(p=1.0))
    pipeline = A.Compose(ops)
    expected = np.stack([pipeline(image=d)["image"] for d in digits]).astype(np.float32)
    full = lambda v: torch.full((len(digits),), float(v))  # noqa: E731
    px = int(shift * 28)
    warps = affine_warps(full(-1 if mirror else 1), full(angle), full(scale), full(scale), full(px), full(px))
    got = warp(torch.from_numpy(digits[:, None]), warps)[:, 0].numpy()
    assert np.abs(got - expected).mean() < 0.2  # of 0..255; an unwarped image differs by ~40
    assert np.abs(digits - expected).mean() > 20


def test_on_device_augmentation_keeps_uint8_range_and_draws_per_image(mnist):
    images = torch.from_numpy(np.repeat(mnist[0][:1, None], 64, axis=0))
    out = augment_on_device(images, aug_ranges(TrainConfig(aug="affine")), torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32 and out.shape == images.shape and 0 <= out.min() and out.max() <= 255.001
    assert len({round(v, 3) for v in out.flatten(1).mean(1).tolist()}) > 50  # one copy, 64 different draws
    assert torch.equal(augment_on_device(images, None, torch.Generator()), images.float())


@pytest.mark.parametrize("aug", ["rotate", "affine"])
def test_device_and_albumentations_change_digits_alike(mnist, aug):
    """Over 2,000 real digits, both pipelines move pixels by the same amount on average."""
    digits, cfg = mnist[0][:2000], TrainConfig(aug=aug)
    pipeline = train_transform(cfg, seed=0)
    host = np.stack([pipeline(image=d)["image"] for d in digits]).astype(np.float32)
    device = augment_on_device(torch.from_numpy(digits[:, None]), aug_ranges(cfg), torch.Generator().manual_seed(0))[:, 0]
    host_change, device_change = np.abs(host - digits).mean(), np.abs(device.numpy() - digits).mean()
    assert abs(device_change / host_change - 1) < 0.05, (host_change, device_change)
