"""Pseudo-labels (`cv --set pseudo=RUN`): fold K trains on its own rows plus the test rows that the
source run's fold K model is confident about, labelled by that model; validation rows never move;
a source that cannot label this run's folds is refused in one line before anything is written."""
import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import kaggle_vit.run.fold as fold_module
from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, validate_config
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.run.cv import run_cv

runner = CliRunner()
TINY = TrainConfig(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, epochs=1, batch_size=64,
                   folds=2, device="cpu", num_workers=0, tta=1, jobs=1)


@pytest.fixture(scope="module")
def source(small_comp, small_spec, tmp_path_factory):
    """A finished 2-fold run to take pseudo-labels from."""
    run = tmp_path_factory.mktemp("pseudo") / "source"
    run_cv(TINY, load_competition(small_spec, small_comp), run)
    return run


def test_each_fold_trains_on_its_rows_plus_its_source_folds_confident_test_rows(small_comp, small_spec, source,
                                                                              tmp_path, monkeypatch):
    data = load_competition(small_spec, small_comp)
    seen = {}
    real_fit = fold_module.fit

    def spy(model, train, valid, cfg, **kwargs):
        seen[len(seen) + 1] = (train.gather(np.arange(len(train))), np.asarray(train.labels).copy(), len(valid))
        return real_fit(model, train, valid, cfg, **kwargs)

    monkeypatch.setattr(fold_module, "fit", spy)
    # a threshold that some test rows pass and others fail under both source folds (one short epoch)
    threshold = float(min(np.median(np.load(source / f"fold{k}" / "test_probs.npy").max(1)) for k in (1, 2)))
    cfg = dataclasses.replace(TINY, pseudo=str(source), pseudo_threshold=threshold)
    result = run_cv(cfg, data, tmp_path / "run")
    folds = pd.read_csv(source / "folds.csv")["fold"].to_numpy()
    for k in (1, 2):
        probs = np.load(source / f"fold{k}" / "test_probs.npy")
        rows = np.flatnonzero(probs.max(1) >= threshold)  # what fold k's source model is sure enough of
        assert 0 < len(rows) < len(probs)
        images, labels, n_valid = seen[k]
        own = np.flatnonzero(folds != k)
        assert n_valid == (folds == k).sum() and len(images) == len(own) + len(rows)
        np.testing.assert_array_equal(images[len(own):], data.test.images[rows])
        np.testing.assert_array_equal(labels[len(own):], probs[rows].argmax(1))
        np.testing.assert_array_equal(images[:len(own)], data.train.images[own])
        assert result.metrics.folds[k - 1].pseudo_rows == len(rows)
    oof = pd.read_csv(tmp_path / "run" / "oof.csv")
    assert len(oof) == len(data.train.labels)  # OOF covers the training rows only


def test_a_source_that_cannot_label_this_run_is_one_line_before_anything_is_written(small_comp, small_spec, source,
                                                                                     tmp_path):
    data = load_competition(small_spec, small_comp)
    cases = {"missing": (tmp_path / "nope", "not a cv run folder"),
             "other folds": (source, "its folds differ from this run's")}
    for name, (path, message) in cases.items():
        cfg = dataclasses.replace(TINY, pseudo=str(path), seed=7 if name == "other folds" else TINY.seed)
        with pytest.raises(KaggleVitError, match=message):
            run_cv(cfg, data, tmp_path / name)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob("folds-*.csv"))  # nor the shared split
    unfinished = tmp_path / "unfinished"
    shutil.copytree(source, unfinished)
    (unfinished / "fold2" / "result.json").unlink()
    with pytest.raises(KaggleVitError, match="fold 2 is not finished"):
        run_cv(dataclasses.replace(TINY, pseudo=str(unfinished)), data, tmp_path / "run")
    with pytest.raises(KaggleVitError, match=r"pseudo_threshold is a probability in \(0, 1\], got 1.5"):
        validate_config(dataclasses.replace(TINY, pseudo_threshold=1.5))


def test_cli_refuses_an_unfinished_source_with_exit_2(small_comp, source, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(source, unfinished)
    (unfinished / "fold1" / "test_probs.npy").unlink()
    result = runner.invoke(app, ["cv", "--data-dir", str(small_comp), "--folds", "2", "--epochs", "1", "--quiet",
                                 "--run-dir", str(tmp_path / "run"), "--set", f"pseudo={unfinished}"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "fold 1 is not finished" in result.output and not (tmp_path / "run").exists()
