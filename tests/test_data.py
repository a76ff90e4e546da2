import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.data import tables as data_mod
from kaggle_vit.data.folds import load_or_make_folds
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.data.tables import cache_path, load_image_csv
from kaggle_vit.train.dataset import ImageDataset, keep_batch

runner = CliRunner()


@pytest.fixture
def comp(tmp_path: Path, small_comp: Path) -> Path:
    dest = tmp_path / "data" / "digit-recognizer"
    shutil.copytree(small_comp, dest, ignore=shutil.ignore_patterns(".kvcache"))
    return dest


def _edit(path: Path, row: int, col: str, value: str) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row - 1, col] = value
    frame.to_csv(path, index=False)


def _run_data(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return runner.invoke(app, ["data", "digit-recognizer"])


@pytest.mark.parametrize(
    "file, row, col, value, message",
    [
        ("train.csv", 7, "pixel300", "300", "row 7, column 'pixel300': pixel value 300 is outside 0..255"),
        ("train.csv", 3, "pixel5", "", "row 3, column 'pixel5': empty cell"),
        ("train.csv", 9, "label", "12", "row 9, column 'label': label 12 is outside 0..9"),
        ("train.csv", 4, "pixel10", "abc", "row 4, column 'pixel10': 'abc' is not a number"),
        ("train.csv", 5, "pixel11", "2.5", "row 5, column 'pixel11': 2.5 is not an integer"),
        ("test.csv", 2, "pixel783", "-1", "row 2, column 'pixel783': pixel value -1 is outside 0..255"),
        ("sample_submission.csv", 6, "ImageId", "999", "row 6, column 'ImageId': id 999 does not match"),
    ],
)
def test_bad_cells_named_exit_2(comp, tmp_path, monkeypatch, file, row, col, value, message):
    _edit(comp / file, row, col, value)
    before = (comp / file).read_bytes()
    result = _run_data(tmp_path, monkeypatch)
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and file in line and message in line and "Traceback" not in line
    assert (comp / file).read_bytes() == before  # nothing the user had is touched
    assert not list(comp.glob(f".kvcache/{file}.*"))


def test_wrong_column_count(comp, tmp_path, monkeypatch):
    frame = pd.read_csv(comp / "train.csv")
    frame.drop(columns=["pixel783"]).to_csv(comp / "train.csv", index=False)
    result = _run_data(tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert "train.csv: row 0: missing column 'pixel783': expected 784 pixel columns" in result.output
    assert "found 783" in result.output


def test_ragged_row_and_label_in_test(comp, tmp_path, monkeypatch):
    lines = (comp / "train.csv").read_text().splitlines()
    lines[3] += ",0"
    (comp / "train.csv").write_text("\n".join(lines) + "\n")
    result = _run_data(tmp_path, monkeypatch)
    assert result.exit_code == 2 and "train.csv: row 3: 786 fields, but the header has 785" in result.output
    frame = pd.read_csv(comp / "test.csv")
    pd.concat([pd.DataFrame({"label": 0}, index=frame.index), frame], axis=1).to_csv(comp / "test.csv", index=False)
    from kaggle_vit.errors import KaggleVitError
    from kaggle_vit.spec import load_spec

    with pytest.raises(KaggleVitError, match="test.csv: row 0, column 'label': the test file must not have a label column"):
        load_image_csv(comp / "test.csv", load_spec("digit-recognizer"), train=False)


def test_cache_is_used_and_invalidated(comp, small_spec, monkeypatch):
    first = load_image_csv(comp / "train.csv", small_spec, train=True)
    assert first.images.shape == (600, 1, 28, 28) and first.images.dtype == np.uint8
    assert cache_path(comp / "train.csv", small_spec, train=True).exists()
    real_parse = data_mod.parse_image_csv
    monkeypatch.setattr(data_mod, "parse_image_csv", lambda *a, **k: pytest.fail("cache not used"))
    again = load_image_csv(comp / "train.csv", small_spec, train=True)
    assert np.array_equal(again.images, first.images) and np.array_equal(again.labels, first.labels)
    _edit(comp / "train.csv", 1, "label", str((first.labels[0] + 1) % 10))
    calls = []
    monkeypatch.setattr(data_mod, "parse_image_csv", lambda *a, **k: calls.append(1) or real_parse(*a, **k))
    changed = load_image_csv(comp / "train.csv", small_spec, train=True)
    assert calls and changed.labels[0] == (first.labels[0] + 1) % 10


def test_dataset_scales_to_unit_range(comp, small_spec):
    d = load_competition(small_spec, comp)
    ds = ImageDataset(d.train.images, d.train.labels)
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.item() == d.train.labels[0]
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    loader = torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=keep_batch)
    xb, yb = next(iter(loader))
    assert xb.shape == (64, 1, 28, 28) and torch.equal(yb, torch.as_tensor(d.train.labels[:64]))
    (tb,) = ImageDataset(d.test.images).__getitems__([0, 1])
    assert tb.shape == (2, 1, 28, 28)


def test_folds_stratified_and_saved(comp, small_spec, tmp_path):
    labels = load_competition(small_spec, comp).train.labels
    folds = load_or_make_folds(tmp_path / "folds.csv", labels, 5, seed=3)
    assert sorted(np.unique(folds)) == [1, 2, 3, 4, 5]
    for k in range(1, 6):
        per_class = np.bincount(labels[folds == k], minlength=10)
        assert np.all(np.abs(per_class - np.bincount(labels) / 5) <= 1)
    assert np.array_equal(load_or_make_folds(tmp_path / "folds.csv", labels, 5, seed=99), folds)


def test_grouped_augmentation_shares_one_draw_per_group(comp, small_spec):
    from kaggle_vit.config import TrainConfig
    from kaggle_vit.train.augment import train_transform

    image = load_competition(small_spec, comp).train.images[:1]
    same = np.repeat(image, 10, axis=0)  # ten copies of one digit
    ds = ImageDataset(same, np.zeros(10, dtype=np.int64), train_transform(TrainConfig(rotate=30), seed=0), group=4)
    x, _ = ds.__getitems__(list(range(10)))
    assert x.shape == (10, 1, 28, 28)
    groups = [x[0:4], x[4:8], x[8:10]]  # 10 = 4 + 4 + 2: the last group is short
    for g in groups:
        assert all(torch.equal(g[0], im) for im in g)  # one rotation per group
    assert not torch.equal(groups[0][0], groups[1][0]) and not torch.equal(groups[1][0], groups[2][0])
    assert not torch.equal(x[0], ImageDataset(same)[0][0])  # and it did rotate


def test_normalisation_comes_from_the_model():
    import timm

    import kaggle_vit.models.vit  # noqa: F401  (registers the kvit_* family with timm)
    from kaggle_vit.train.dataset import DataConfig, resolve_data_config

    kvit = resolve_data_config(timm.create_model("kvit_pico_patch4_28", num_classes=10, in_chans=1))
    assert (kvit.mean, kvit.std, kvit.input_size) == ((0.5,), (0.5,), (1, 28, 28))
    x = (torch.arange(784) % 256).to(torch.uint8).reshape(1, 1, 28, 28)
    assert torch.equal(kvit.prepare(x), x.float().mul_(1.0 / 127.5).sub_(1.0))  # [-1, 1], bit for bit as before
    imagenet = DataConfig((3, 28, 28), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rgb = x.expand(1, 3, 28, 28).contiguous()
    expected = (rgb.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet.prepare(rgb), expected)
    timm_vit = resolve_data_config(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28,
                                                     patch_size=4, in_chans=1, num_classes=10))
    assert timm_vit.prepare(x).shape == (1, 1, 28, 28)  # its RGB numbers serve a grey image
