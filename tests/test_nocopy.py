"""Data without copies: every layout's images are one memory-mapped .npy per split, a fold trains and
predicts on rows of it (its pseudo-labelled test rows too), and fold workers map the same files."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, PoolSpy, snapshot
from test_faults import immutable  # noqa: F401 - a fixture: a folder even root cannot write
from test_layouts import TINY as FILES_TINY
from test_layouts import files_competition, files_spec

import kaggle_vit.run.fold as fold_module
from kaggle_vit.config import TrainConfig
from kaggle_vit.data import tables as data_mod
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.data.tables import load_image_csv
from kaggle_vit.run import jobs
from kaggle_vit.run.cv import run_cv
from kaggle_vit.spec import load_spec
from kaggle_vit.train.engine import NoProgress


class _Stopped(Exception):
    """Raised in place of training: the test only wants the datasets a fold would train on."""


def _fold_datasets(cfg: TrainConfig, data, tmp_path: Path, monkeypatch, pseudo_rows: np.ndarray | None):
    """The training and validation datasets of fold 1 of 2 (every other row), with `pseudo_rows`
    of the test set as its pseudo-labelled rows when given."""
    seen = {}

    def stop(model, train, valid, cfg, **kwargs):
        seen.update(train=train, valid=valid)
        raise _Stopped

    monkeypatch.setattr(fold_module, "fit", stop)
    if pseudo_rows is not None:
        monkeypatch.setattr(fold_module, "pseudo_labels", lambda *a: (pseudo_rows, pseudo_rows % 3))
        cfg = dataclasses.replace(cfg, pseudo=str(tmp_path / "source"))
    folds = np.arange(len(data.train.labels)) % 2 + 1
    with pytest.raises(_Stopped):
        fold_module.train_fold(cfg, data, folds, 1, tmp_path / "run", NoProgress())
    return seen["train"], seen["valid"], folds


def _held_arrays(value) -> list:
    """The NumPy arrays and tensors an object holds, directly or in tuples."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _held_arrays(v)]
    return [a for v in vars(value).values() for a in _held_arrays(v)] if hasattr(value, "__dict__") else []


def _assert_no_copy(dataset, caches: list[np.ndarray]) -> None:
    """Every array the dataset holds is a cache itself (the same memory) or small: row numbers and
    labels, 8 bytes a row at most, never a copy of images."""
    for array in _held_arrays(dataset):
        if isinstance(array, np.ndarray) and any(np.shares_memory(array, cache) for cache in caches):
            continue
        size = array.nbytes if isinstance(array, np.ndarray) else array.numel() * array.element_size()
        assert size <= 8 * len(dataset), f"the dataset holds {size:,} bytes of its own ({type(array).__name__})"


@pytest.fixture
def pixels(tmp_path: Path, small_comp: Path, small_spec):
    comp = tmp_path / "pixels"
    shutil.copytree(small_comp, comp, ignore=shutil.ignore_patterns(".kvcache"))
    return comp, load_competition(small_spec, comp), TrainConfig(**TINY)


@pytest.fixture
def files(tmp_path: Path, mnist):
    comp = files_competition(tmp_path / "files", mnist, n_train=120, n_test=30)
    return comp, load_competition(load_spec(files_spec(tmp_path)), comp), TrainConfig(**FILES_TINY)


@pytest.mark.parametrize("pseudo", [False, True], ids=["own rows", "with pseudo-labels"])
@pytest.mark.parametrize("layout", ["pixels", "files"])
def test_a_fold_trains_on_rows_of_the_memory_mapped_cache_not_a_copy(layout, pseudo, request, tmp_path, monkeypatch):
    comp, data, cfg = request.getfixturevalue(layout)
    pseudo_rows = np.array([0, 3, 4, len(data.test.ids) - 1]) if pseudo else None
    train, valid, folds = _fold_datasets(cfg, data, tmp_path, monkeypatch, pseudo_rows)
    for cache in (data.train.images, data.test.images):
        assert isinstance(cache, np.memmap) and Path(cache.filename).parent == (comp / ".kvcache").resolve()
    # the fold's datasets are the cache's own memory, gathered a batch at a time
    assert isinstance(train.images, np.memmap) and np.shares_memory(train.images, data.train.images)
    _assert_no_copy(train, [data.train.images, data.test.images])
    _assert_no_copy(valid, [data.train.images])
    own, held_out = np.flatnonzero(folds != 1), np.flatnonzero(folds == 1)
    expected = data.train.images[own] if not pseudo else np.concatenate([data.train.images[own],
                                                                         data.test.images[pseudo_rows]])
    assert len(train) == len(expected) and np.array_equal(train.gather(np.arange(len(train))), expected)
    assert np.array_equal(valid.gather(np.arange(len(valid))), data.train.images[held_out])
    labels = data.train.labels[own] if not pseudo else np.concatenate([data.train.labels[own], pseudo_rows % 3])
    assert np.array_equal(train.labels.numpy(), labels)


def test_a_pixel_csv_is_cached_as_memory_mapped_npy_and_rebuilt_when_it_changes(pixels, small_spec, monkeypatch):
    comp, _, _ = pixels
    old = comp / "train.csv.kvcache.npz"  # an older kaggle-vit's cache: ignored, left alone
    old.write_bytes(b"not ours to delete")
    first = load_image_csv(comp / "train.csv", small_spec, train=True)
    for array in (first.images, first.labels, first.ids):
        assert isinstance(array, np.memmap) and Path(array.filename).parent == (comp / ".kvcache").resolve()
        assert np.load(array.filename, allow_pickle=False).shape == array.shape  # a plain .npy
    key = json.loads(Path(str(first.images.filename).replace(".images.npy", ".json")).read_text())
    assert key["rows"] == 600 and key["key"] in str(first.images.filename)
    parse = data_mod.parse_image_csv
    monkeypatch.setattr(data_mod, "parse_image_csv", lambda *a, **k: pytest.fail("the cache was not used"))
    again = load_image_csv(comp / "train.csv", small_spec, train=True)
    assert again.images.filename == first.images.filename and np.array_equal(again.images, first.images)
    frame = pd.read_csv(comp / "train.csv")
    frame.loc[0, "label"] = (frame.loc[0, "label"] + 1) % 10
    frame.to_csv(comp / "train.csv", index=False)
    monkeypatch.setattr(data_mod, "parse_image_csv", parse)
    changed = load_image_csv(comp / "train.csv", small_spec, train=True)
    assert changed.labels[0] == frame.loc[0, "label"] and changed.images.filename != first.images.filename
    assert not Path(first.images.filename).exists() and not Path(first.labels.filename).exists()  # the stale cache
    new_key = Path(changed.images.filename).name.split(".")[2]  # train.csv.KEY.images.npy
    assert sorted(p.name.split(".")[2] for p in (comp / ".kvcache").glob("train.csv.*")) == [new_key] * 4
    assert old.read_bytes() == b"not ours to delete"


def test_a_read_only_data_folder_gets_its_pixel_cache_in_the_users_cache(pixels, small_spec, tmp_path, monkeypatch,
                                                                         immutable):  # noqa: F811
    comp, _, _ = pixels
    shutil.rmtree(comp / ".kvcache", ignore_errors=True)
    monkeypatch.setenv("KAGGLE_VIT_CACHE", str(tmp_path / "user-cache"))
    immutable(comp)  # as Kaggle's /kaggle/input
    before = snapshot(comp)
    table = load_image_csv(comp / "train.csv", small_spec, train=True)
    assert isinstance(table.images, np.memmap)
    assert Path(table.images.filename).is_relative_to((tmp_path / "user-cache").resolve())
    assert snapshot(comp) == before


def test_fold_workers_map_the_cache_and_the_run_gets_no_copy_of_it(pixels, tmp_path, monkeypatch):
    comp, data, cfg = pixels
    cfg = dataclasses.replace(cfg, epochs=1)
    spy = PoolSpy(monkeypatch)
    parallel = run_cv(dataclasses.replace(cfg, jobs=2), data, tmp_path / "parallel")
    assert parallel.complete and len(spy.pools) == 1
    sent, files_there = spy.pools[0]["sent"], spy.pools[0]["files"]
    assert sent < data.train.images.nbytes / 10  # the rows' labels, ids and folds; no array of images
    assert not any(name.endswith(".npy") for name in files_there), files_there
    assert not list((tmp_path / "parallel").glob(".arrays-*"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's one thread
    try:
        run_cv(dataclasses.replace(cfg, jobs=1), data, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    for k in (1, 2):
        for name in ("test_probs.npy",):
            a, b = (np.load(tmp_path / run / f"fold{k}" / name) for run in ("parallel", "one"))
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert parallel.metrics.oof_acc == json.loads((tmp_path / "one" / "metrics.json").read_text())["oof_acc"]


def test_a_worker_maps_the_rows_it_was_given_and_stages_only_arrays_in_memory(pixels, tmp_path):
    from kaggle_vit.data.cache import mapped_rows

    comp, data, _ = pixels
    first_rows = dataclasses.replace(data.train, images=data.train.images[:400], labels=data.train.labels[:400],
                                     ids=data.train.ids[:400])  # a notebook's MAX_TRAIN_ROWS
    in_memory = dataclasses.replace(data.test, images=np.array(data.test.images))
    staging, shared = jobs._share(dataclasses.replace(data, train=first_rows, test=in_memory),
                                     np.ones(400, dtype=np.int64), tmp_path)
    opened, folds = shared.open()
    assert Path(opened.train.images.filename) == Path(data.train.images.filename)  # the cache itself
    assert np.array_equal(opened.train.images, data.train.images[:400]) and len(folds) == 400
    assert sorted(p.name for p in staging.iterdir()) == ["test_images.npy"]  # the one array no file holds
    assert np.array_equal(opened.test.images, data.test.images)
    assert mapped_rows(data.train.images[[1, 2]]) is None and mapped_rows(data.train.images[5:9]).start == 5
