"""Training batches: on the device (uint8 images kept there, warped in batches) or from one
persistent DataLoader with albumentations; both repeat from the epoch's seed alone."""
import dataclasses

import pytest
import torch

from kaggle_vit.config import TrainConfig
from kaggle_vit.train.batches import DeviceBatches, HostBatches, skip_easy_rows, train_batches
from kaggle_vit.train.dataset import ImageDataset
from kaggle_vit.train.engine import fit

CFG = TrainConfig(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, epochs=2, batch_size=50,
                  lr=2e-3, aug="affine", num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def digits(mnist) -> ImageDataset:
    return ImageDataset(mnist[0][:300, None], mnist[1][:300])


def _epoch(source, seed: int, rows: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    source.set_epoch(seed, rows)
    return [(x.clone(), y.clone()) for x, y, _ in source]


@pytest.mark.parametrize("where", ["on", "off"])
def test_an_epoch_is_a_shuffle_of_every_row_and_repeats_from_its_seed(digits, where):
    source = train_batches(digits, dataclasses.replace(CFG, data_on_device=where), torch.device("cpu"))
    assert isinstance(source, DeviceBatches if where == "on" else HostBatches) and len(source) == 6
    first, again, other = _epoch(source, 7), _epoch(source, 7), _epoch(source, 8)
    labels = torch.cat([y for _, y in first])
    assert sorted(labels.tolist()) == sorted(digits.labels.tolist())  # every row once
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])
    x = first[0][0]
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32 and -1.0001 <= x.min() and x.max() <= 1.0001


def test_skip_easy_leaves_out_only_rows_below_the_mean_loss_and_reweights_the_easy_ones_kept():
    losses = torch.cat([torch.full((900,), 0.01), torch.full((100,), 2.0)])  # mean 0.209: 900 easy rows
    rows, weights = skip_easy_rows(losses, 0.5, torch.Generator().manual_seed(0))
    assert set(range(900, 1000)) <= set(rows.tolist())  # every hard row is kept
    assert 400 < 1000 - len(rows) < 500  # about half of the easy rows left out
    assert torch.equal(weights, torch.where(losses < losses.mean(), 2.0, 1.0))
    again, _ = skip_easy_rows(losses, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)  # the generator's seed decides
    assert len(skip_easy_rows(torch.ones(50), 0.9, torch.Generator())[0]) == 50  # equal losses: nothing is easy


@pytest.mark.parametrize("where", ["on", "off"])
def test_an_epoch_of_some_rows_yields_those_rows_and_names_them(digits, where):
    source = train_batches(digits, dataclasses.replace(CFG, data_on_device=where, aug="none"), torch.device("cpu"))
    rows = torch.arange(0, 300, 3)
    source.set_epoch(4, rows)
    assert len(source) == 2
    batches = list(source)
    named = torch.cat([r for _, _, r in batches])
    assert len(set(named.tolist())) == 100 and set(named.tolist()) <= set(rows.tolist())
    for x, y, r in batches:  # each batch's row numbers are its images' and labels' rows
        assert torch.equal(y, digits.labels[r]) and torch.equal(x, digits.data_config.prepare(torch.from_numpy(digits.images[r.numpy()])))
    source.set_epoch(4)
    assert len(source) == 6


def test_device_batches_without_augmentation_are_the_normalised_rows(digits):
    source = train_batches(digits, dataclasses.replace(CFG, data_on_device="on", aug="none"), torch.device("cpu"))
    table = digits.data_config.prepare(torch.from_numpy(digits.images)).flatten(1)
    for x, y in _epoch(source, 3):
        distance = (x.flatten(1)[:, None, :] - table[None]).abs().amax(-1)
        assert (distance.min(1).values == 0).all() and torch.equal(digits.labels[distance.argmin(1)], y)


def test_host_batches_do_not_depend_on_loader_workers(digits):
    """A batch's augmentation is seeded by the epoch and its place in it, so 0 or 2 loader workers give the same batches."""
    alone = _epoch(train_batches(digits, CFG, torch.device("cpu")), 5)
    helped = _epoch(train_batches(digits, dataclasses.replace(CFG, num_workers=2), torch.device("cpu")), 5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, helped))


def test_auto_keeps_a_cpu_on_albumentations(digits):
    assert isinstance(train_batches(digits, CFG, torch.device("cpu")), HostBatches)


def test_fit_learns_from_device_batches(mnist):
    train = ImageDataset(mnist[0][:2000, None], mnist[1][:2000])
    valid = ImageDataset(mnist[0][2000:2500, None], mnist[1][2000:2500])
    from kaggle_vit.models.factory import create_model
    from kaggle_vit.spec import load_spec

    cfg = TrainConfig(epochs=3, batch_size=32, num_workers=0, device="cpu", data_on_device="on")
    torch.manual_seed(0)
    result = fit(create_model(cfg, load_spec("digit-recognizer")), train, valid, cfg, seed=1)
    assert result.history[-1].valid_acc > 0.8 and result.history[-1].train_loss < result.history[0].train_loss


@pytest.mark.parametrize("setting,message", [
    ("data_on_device=always", "--set: data_on_device = 'always' must be one of auto, on, off"),
    ("compile_mode=fast", "--set: compile_mode = 'fast' must be one of default, reduce-overhead, max-autotune, "
                          "max-autotune-no-cudagraphs"),
    ("devices=0,x", "devices 0,x: give GPU indices such as 0,1, or all"),
])
def test_gpu_settings_refuse_bad_values_in_one_line(small_comp, tmp_path, setting, message):
    from typer.testing import CliRunner

    from kaggle_vit.cli import app

    result = CliRunner().invoke(app, ["cv", "--data-dir", str(small_comp), "--run-dir", str(tmp_path / "r"), "--set", "device=auto",
                                      "--set", setting])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [f"error: {message}"], result.output
