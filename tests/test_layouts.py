"""Competitions shipped as image files, built from real MNIST digits in each Kaggle layout."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import png_bomb
from PIL import Image
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.data import images as images_mod
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.spec import load_spec

runner = CliRunner()
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TINY = dict(model="kvit_pico_patch4_28", embed_dim=32, depth=1, num_heads=2, epochs=1, batch_size=64, folds=2,
            device="cpu", num_workers=0, tta=1, jobs=1)


def _save(image: np.ndarray, path: Path, size: int = 32) -> None:
    """A 28x28 MNIST digit saved as an RGB file of another size, as photo competitions ship them."""
    Image.fromarray(image).convert("RGB").resize((size, size)).save(path)


def files_competition(root: Path, mnist, n_train: int = 120, n_test: int = 30, ext: str = ".png",
                      ids_with_ext: bool = False) -> Path:
    """cifar-10's layout: train/ID.png, trainLabels.csv (id,label) with class names, test/ID.png."""
    tx, ty, vx, _ = mnist
    for folder in ("train", "test"):
        (root / folder).mkdir(parents=True)
    rows = []
    for i in range(n_train):
        _save(tx[i], root / "train" / f"{i}{ext}")
        rows.append((f"{i}{ext}" if ids_with_ext else str(i), NAMES[ty[i]]))
    pd.DataFrame(rows, columns=["id", "label"]).to_csv(root / "trainLabels.csv", index=False)
    for i in range(n_test):
        _save(vx[i], root / "test" / f"{1000 + i}{ext}")
    pd.DataFrame({"id": [f"{1000 + i}{ext}" if ids_with_ext else str(1000 + i) for i in range(n_test)],
                  "label": "zero"}).to_csv(root / "sampleSubmission.csv", index=False)
    return root


def files_spec(tmp_path: Path, **extra: str) -> Path:
    lines = ['name = "digits-as-files"', "", "[files]", 'layout = "files"', 'train = "trainLabels.csv"',
             'train_images = "train"', 'test_images = "test"', 'sample_submission = "sampleSubmission.csv"',
             *(f'{k} = "{v}"' for k, v in extra.items()), "", "[columns]", 'id = "id"', 'label = "label"',
             'submission = ["id", "label"]', "", "[image]", "height = 32", "width = 32", "channels = 3"]
    path = tmp_path / "files.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def folders_competition(root: Path, mnist, n_train: int = 100, n_test: int = 20) -> Path:
    """plant-seedlings-classification's layout: train/<class>/<file>.png, test/<file>.png, file,species."""
    tx, ty, vx, _ = mnist
    for i in range(n_train):
        folder = root / "train" / NAMES[ty[i]]
        folder.mkdir(parents=True, exist_ok=True)
        _save(tx[i], folder / f"{i:05d}.png", size=40)
    (root / "test").mkdir(parents=True)
    files = [f"t{i:04d}.png" for i in range(n_test)]
    for i, name in enumerate(files):
        _save(vx[i], root / "test" / name, size=40)
    pd.DataFrame({"file": files, "species": "zero"}).to_csv(root / "sample_submission.csv", index=False)
    return root


def folders_spec(tmp_path: Path) -> Path:
    path = tmp_path / "folders.toml"
    path.write_text('name = "digits-in-folders"\n\n[files]\nlayout = "folders"\n\n[columns]\n'
                    'submission = ["file", "species"]\n\n[image]\nheight = 28\nwidth = 28\nchannels = 1\n')
    return path


def test_files_layout_reads_resizes_and_names_classes(tmp_path, mnist):
    comp = files_competition(tmp_path / "c", mnist)
    data = load_competition(load_spec(files_spec(tmp_path)), comp)
    assert data.train.images.shape == (120, 3, 32, 32) and data.train.images.dtype == np.uint8
    assert data.test.images.shape == (30, 3, 32, 32) and list(data.test.ids[:2]) == ["1000", "1001"]
    assert data.spec.class_names == tuple(sorted(NAMES)) and data.spec.num_classes == 10  # discovered, sorted
    labels = [data.spec.class_names[k] for k in data.train.labels[:5]]
    assert labels == [NAMES[y] for y in mnist[1][:5]]
    # the pixels are the digit's: grey stays grey in all three channels, and bright where MNIST is
    img = data.train.images[0]
    assert np.array_equal(img[0], img[1]) and img.max() > 200
    expected = np.asarray(Image.fromarray(mnist[0][0]).convert("RGB").resize((32, 32)))
    assert np.abs(img.transpose(1, 2, 0).astype(int) - expected).max() <= 1


def test_ids_with_their_extension_and_jpeg(tmp_path, mnist):
    comp = files_competition(tmp_path / "c", mnist, ext=".jpg", ids_with_ext=True)
    data = load_competition(load_spec(files_spec(tmp_path)), comp)
    assert data.train.images.shape == (120, 3, 32, 32) and data.test.ids[0] == "1000.jpg"


def test_ids_that_look_like_numbers_keep_their_zeros(tmp_path, mnist):
    comp = files_competition(tmp_path / "c", mnist, n_train=40)
    for i in range(40):
        (comp / "train" / f"{i}.png").rename(comp / "train" / f"{i:04d}.png")
    frame = pd.read_csv(comp / "trainLabels.csv", dtype=str)
    frame["id"] = [f"{i:04d}" for i in range(40)]
    frame.to_csv(comp / "trainLabels.csv", index=False)
    data = load_competition(load_spec(files_spec(tmp_path)), comp)
    assert data.train.ids[7] == "0007" and np.array_equal(data.train.images[7, 0] > 100,
                                                           np.asarray(Image.fromarray(mnist[0][7]).resize((32, 32))) > 100)


def test_decoded_images_are_cached_and_rebuilt_when_a_file_changes(tmp_path, mnist, monkeypatch):
    comp = files_competition(tmp_path / "c", mnist)
    spec = load_spec(files_spec(tmp_path))
    first = load_competition(spec, comp)
    assert isinstance(first.train.images, np.memmap)  # memory-mapped: larger than RAM works
    monkeypatch.setattr(images_mod, "decode", lambda *a: pytest.fail("decoded again"))
    again = load_competition(spec, comp)
    assert np.array_equal(again.train.images, first.train.images)
    monkeypatch.undo()
    _save(mnist[0][500], comp / "train" / "3.png")
    os.utime(comp / "train" / "3.png", ns=(1, 1))
    changed = load_competition(spec, comp)
    assert not np.array_equal(changed.train.images[3], first.train.images[3])
    assert np.array_equal(changed.train.images[4], first.train.images[4])
    assert len(list((comp / ".kvcache").glob("train-*.npy"))) == 1  # the stale cache is gone


def test_folders_layout_end_to_end_writes_class_names(tmp_path, mnist, monkeypatch):
    comp = folders_competition(tmp_path / "c", mnist)
    spec_path = folders_spec(tmp_path)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(to_toml(TrainConfig(**TINY)))
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"file": [f"t{i:04d}.png" for i in range(20)], "species": [NAMES[y] for y in mnist[3][:20]]}).to_csv(
        comp / "solution.csv", index=False)
    for args in (["data", "-c", spec_path, "--dest", comp], ["cv", "-c", spec_path, "--config", cfg, "--data-dir", comp, "-q"],
                 ["submit", "-c", spec_path, "--data-dir", comp, "-o", "sub.csv"],
                 ["score", "sub.csv", "-c", spec_path, "--data-dir", comp]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and (tmp_path / "runs" / "digits-in-folders").is_dir()
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub.columns) == ["file", "species"] and sub["file"].tolist() == [f"t{i:04d}.png" for i in range(20)]
    assert set(sub["species"]) <= set(NAMES)
    run = next((tmp_path / "runs" / "digits-in-folders").glob("kvit_*"))
    assert __import__("json").loads((run / "metrics.json").read_text())["class_names"] == sorted(
        {NAMES[y] for y in mnist[1][:100]})


def test_pixel_csvs_numbered_from_1_with_test_ids_from_0(tmp_path, mnist):
    """Fashion-MNIST's CSV columns (pixel1..pixel784) and Kannada-MNIST's test file (id column from 0)."""
    tx, ty, vx, _ = mnist
    cols = [f"pixel{i}" for i in range(1, 785)]
    train = pd.DataFrame(tx[:60].reshape(60, -1), columns=cols)
    train.insert(0, "label", ty[:60])
    train.to_csv(tmp_path / "train.csv", index=False)
    test = pd.DataFrame(vx[:10].reshape(10, -1), columns=cols)
    test.insert(0, "id", range(10))
    test.to_csv(tmp_path / "test.csv", index=False)
    pd.DataFrame({"id": range(10), "label": 0}).to_csv(tmp_path / "sample_submission.csv", index=False)
    spec = tmp_path / "k.toml"
    spec.write_text('name = "kannada-like"\n\n[files]\n\n[columns]\nid = "id"\npixel = "pixel{i}"\npixel_start = 1\n'
                    'submission = ["id", "label"]\n\n[image]\nheight = 28\nwidth = 28\n\n[classes]\nnum_classes = 10\n')
    data = load_competition(load_spec(spec), tmp_path)
    assert np.array_equal(data.train.images[:, 0], tx[:60]) and list(data.test.ids) == list(range(10))


def _missing_image(comp: Path) -> None:
    (comp / "train" / "7.png").unlink()


def _truncated_image(comp: Path) -> None:
    raw = (comp / "train" / "7.png").read_bytes()
    (comp / "train" / "7.png").write_bytes(raw[: len(raw) // 2])


def _unknown_label(comp: Path) -> None:
    frame = pd.read_csv(comp / "trainLabels.csv", dtype=str)
    frame.loc[7, "label"] = "ten"
    frame.to_csv(comp / "trainLabels.csv", index=False)


def _empty_label(comp: Path) -> None:
    frame = pd.read_csv(comp / "trainLabels.csv", dtype=str)
    frame.loc[4, "label"] = ""
    frame.to_csv(comp / "trainLabels.csv", index=False)


@pytest.mark.parametrize("damage, message", [
    (_missing_image, "trainLabels.csv: row 8, column 'id': id '7' has no image file in"),
    (_empty_label, "trainLabels.csv: row 5, column 'label': empty cell"),
    (_truncated_image, "train/7.png: cannot decode the image"),
    (_unknown_label, "trainLabels.csv: row 8, column 'label': label 'ten' is not one of the 10 classes"),
])
def test_bad_image_input_is_one_line_and_writes_nothing(tmp_path, mnist, monkeypatch, damage, message):
    comp = files_competition(tmp_path / "c", mnist)
    spec = files_spec(tmp_path)
    spec.write_text(spec.read_text() + "\n[classes]\nnames = " + str(NAMES).replace("'", '"') + "\n")
    damage(comp)
    before = {p: p.read_bytes() for p in comp.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "-c", str(spec), "--dest", str(comp)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    after = {p: p.read_bytes() for p in comp.rglob("*") if p.is_file() and ".kvcache" not in p.parts}
    assert after == before and not any((comp / ".kvcache").glob("train-*.npy"))


def _duplicate_id(comp: Path) -> None:
    frame = pd.read_csv(comp / "trainLabels.csv", dtype=str)
    frame.loc[9, "id"] = frame.loc[2, "id"]
    frame.to_csv(comp / "trainLabels.csv", index=False)


def _sample_id_without_image(comp: Path) -> None:
    (comp / "test" / "1004.png").unlink()


@pytest.mark.parametrize("damage, message", [
    (_duplicate_id, "trainLabels.csv: row 10, column 'id': duplicate id '2'"),
    (_sample_id_without_image, "sampleSubmission.csv: row 5, column 'id': id '1004' has no image file in"),
])
def test_more_bad_files_input(tmp_path, mnist, monkeypatch, damage, message):
    comp = files_competition(tmp_path / "c", mnist)
    damage(comp)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "-c", str(files_spec(tmp_path)), "--dest", str(comp)])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_an_empty_class_folder_is_named(tmp_path, mnist, monkeypatch):
    comp = folders_competition(tmp_path / "c", mnist)
    (comp / "train" / "ten").mkdir()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "-c", str(folders_spec(tmp_path)), "--dest", str(comp)])
    assert result.exit_code == 2 and f"{comp / 'train' / 'ten'}: empty class folder" in result.output


def _solution(comp: Path, mnist, n_test: int, column: str = "label", ext: str = "") -> None:
    ids = [f"{1000 + i}{ext}" for i in range(n_test)]
    pd.DataFrame({"id": ids, column: [NAMES[y] for y in mnist[3][:n_test]]}).to_csv(comp / "solution.csv", index=False)


def test_files_layout_end_to_end_through_the_cli(tmp_path, mnist, monkeypatch):
    comp = files_competition(tmp_path / "c", mnist)
    _solution(comp, mnist, 30)
    spec, cfg = files_spec(tmp_path), tmp_path / "tiny.toml"
    cfg.write_text(to_toml(TrainConfig(**TINY)))
    monkeypatch.chdir(tmp_path)
    for args in (["data", "-c", spec, "--dest", comp], ["cv", "-c", spec, "--config", cfg, "--data-dir", comp, "-q"],
                 ["submit", "-c", spec, "--data-dir", comp, "-o", "sub.csv"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    sub = pd.read_csv(tmp_path / "sub.csv", dtype=str)
    assert sub["id"].tolist() == [str(1000 + i) for i in range(30)] and set(sub["label"]) <= set(NAMES)
    result = runner.invoke(app, ["score", "sub.csv", "-c", str(spec), "--data-dir", str(comp)])
    assert result.exit_code == 0 and "accuracy" in result.output, result.output
    truth = pd.read_csv(comp / "solution.csv", dtype=str)["label"]
    assert f"{100 * (sub['label'] == truth).mean():.3f}%" in result.output


def test_the_same_digits_as_png_files_or_a_pixel_csv_train_the_same(tmp_path, mnist, small_spec):
    from conftest import build_small

    from kaggle_vit.run.cv import run_cv

    tx, ty, vx, _ = mnist
    csv_dir = build_small(tmp_path / "csv", small_spec, mnist, 600, 20)
    png = tmp_path / "png"
    for folder in ("train", "test"):
        (png / folder).mkdir(parents=True)
    for i in range(600):
        Image.fromarray(tx[i]).save(png / "train" / f"{i}.png")
    for i in range(20):
        Image.fromarray(vx[i]).save(png / "test" / f"{i + 1}.png")
    pd.DataFrame({"ImageId": range(600), "Label": ty[:600]}).to_csv(png / "train.csv", index=False)
    pd.DataFrame({"ImageId": range(1, 21), "Label": 0}).to_csv(png / "sample_submission.csv", index=False)
    spec = tmp_path / "png.toml"
    spec.write_text('name = "digits-png"\n[files]\nlayout = "files"\n[columns]\nid = "ImageId"\nlabel = "Label"\n'
                    'submission = ["ImageId", "Label"]\n[image]\nheight = 28\nwidth = 28\nchannels = 1\n')
    from_png = load_competition(load_spec(spec), png)
    from_csv = load_competition(small_spec, csv_dir)
    assert np.array_equal(from_png.train.images, from_csv.train.images)
    assert np.array_equal(from_png.train.labels, from_csv.train.labels) and from_png.spec.class_names == tuple("0123456789")
    cfg = TrainConfig(**{**TINY, "model": "kvit_pico_patch7_28", "epochs": 3, "batch_size": 32, "aug": "rotate"})
    a, b = run_cv(cfg, from_png, tmp_path / "run-png"), run_cv(cfg, from_csv, tmp_path / "run-csv")
    assert a.metrics.oof_acc == b.metrics.oof_acc and a.metrics.oof_acc > 0.3  # the same pixels and labels: the same run, and it learns


@pytest.mark.parametrize("model", ["kvit_pico_patch4_28", "vit_tiny_patch16_224"])
def test_rgb_jpegs_of_another_size_train_with_kvit_and_timm(tmp_path, mnist, monkeypatch, model):
    comp = files_competition(tmp_path / "c", mnist, n_train=80, n_test=10, ext=".jpg")
    spec = files_spec(tmp_path, image_extension=".jpg")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(to_toml(TrainConfig(**{**TINY, "model": model, "embed_dim": None, "depth": None, "num_heads": None}
                                       if model.startswith("vit") else TINY)))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cv", "-c", str(spec), "--config", str(cfg), "--data-dir", str(comp), "-q"])
    assert result.exit_code == 0, result.output
    from kaggle_vit.run.rundir import RunDir

    run = next((tmp_path / "runs" / "digits-as-files").glob(f"{model}-*"))
    header = RunDir(run).fold(1).read_checkpoint()
    assert header.input_size == (3, 32, 32) and header.kwargs["in_chans"] == 3


def _four_cores(monkeypatch) -> list[str]:
    """Pretend 4 usable cores and record which thread decoded each chunk (slowed so that all run)."""
    decoded_by: list[str] = []
    chunk = images_mod._decode_chunk

    def recorded(*args):
        decoded_by.append(threading.current_thread().name)
        time.sleep(0.02)
        return chunk(*args)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(images_mod, "_decode_chunk", recorded)
    return decoded_by


def test_a_large_set_is_decoded_by_several_threads_in_file_order(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(200):
        paths.append(folder / f"{i}.png")
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(paths[-1])
    decoded_by = _four_cores(monkeypatch)
    images = images_mod.load_images(paths, folder, "train", 8, 8, 3)
    assert [int(image.max()) for image in images] == list(range(200)) and int(images.min(axis=(1, 2, 3)).sum()) == sum(range(200))
    assert len(decoded_by) == 7 and len(set(decoded_by)) > 1 and all(n.startswith("kaggle-vit-decode") for n in decoded_by)


@pytest.mark.parametrize("damage, message", [
    (_truncated_image, "train/7.png: cannot decode the image"),
    (lambda comp: png_bomb(comp / "train" / "90.png", 12000), "train/90.png: refused as a possible decompression bomb"),
])
def test_a_bad_file_among_threads_is_one_line_and_writes_nothing(tmp_path, mnist, monkeypatch, damage, message):
    comp = files_competition(tmp_path / "c", mnist)
    spec = files_spec(tmp_path)
    damage(comp)
    decoded_by = _four_cores(monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "-c", str(spec), "--dest", str(comp)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert len(set(decoded_by)) > 1 and not any((comp / ".kvcache").glob("train-*")) and not list(comp.rglob("*.tmp"))


def test_a_large_jpeg_is_decoded_at_reduced_size(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    yy, xx = np.mgrid[0:1200, 0:1600]
    photo = np.stack([xx // 7 % 256, yy // 5 % 256, (xx + yy) // 11 % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "big.jpg", quality=95)
    loaded_at: list[tuple[int, int]] = []
    load = JpegImagePlugin.JpegImageFile.load
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: (loaded_at.append(self.size), load(self))[1])
    image = images_mod.decode(tmp_path / "big.jpg", 224, 224, 3)
    assert set(loaded_at) == {(400, 300)}  # a quarter of 1600x1200: the smallest DCT scale not below 224x224
    with Image.open(tmp_path / "big.jpg") as full:
        reference = np.asarray(full.convert("RGB").resize((224, 224), Image.Resampling.BOX)).transpose(2, 0, 1)
    assert image.shape == (3, 224, 224) and np.abs(image.astype(int) - reference).mean() < 3
