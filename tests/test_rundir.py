"""The run folder's records: each is written and read back as it was, by RunDir only; a run folder of
kaggle-vit up to 9032e2c (`valid_acc` with the test-time views, `valid_acc_plain` without) reads in
today's names (no suffix: plain; `_views`: with the views)."""
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kaggle_vit.errors import KaggleVitError
from kaggle_vit.records import CheckpointHeader, EpochRecord, FoldResult, RunMetrics, SeedEnsemble
from kaggle_vit.run.rundir import RunDir
from kaggle_vit.spec import load_spec

EPOCHS = [EpochRecord(epoch=1, train_loss=1.2, train_acc=0.6, valid_loss=math.nan, valid_acc=math.nan,
                      valid_score=math.nan, lr=1e-3, seconds=2.5, images=540, images_per_s=300.0),
          EpochRecord(epoch=2, train_loss=0.7, train_acc=0.8, valid_loss=0.5, valid_acc=0.85, valid_score=0.85,
                      lr=5e-4, seconds=2.25, images=540, images_per_s=310.5)]
RESULT = FoldResult(fold=2, best_epoch=2, epochs=2, metric="accuracy", valid_loss=0.5, valid_acc=0.85,
                    valid_score=0.85, valid_acc_views=0.875, valid_score_views=0.875, tta=3, train_seconds=4.75,
                    predict_seconds=0.5, images_per_s=305.25, amp="fp32", device="cpu", pseudo_rows=0)
METRICS = RunMetrics(competition="digit-recognizer", model="kvit_pico_patch7_28", class_names=tuple("0123456789"),
                     metric="accuracy", n_folds=2, folds=(dataclasses.replace(RESULT, fold=1), RESULT), tta=3,
                     oof_acc=0.84, oof_acc_views=0.86, oof_score=0.84, oof_score_views=0.86, oof_loss_views=0.45,
                     train_seconds=9.5, predict_seconds=1.0, version="0.1.0", git="abc1234", config="seed = 42\n",
                     seed_ensemble=SeedEnsemble(runs=("runs/a", "runs/b"), oof_acc_views=0.87, oof_score_views=0.87))
HEADER = CheckpointHeader(model="kvit_pico_patch7_28", kwargs={"num_classes": 10, "in_chans": 1, "img_size": (28, 28)},
                          fold=2, competition="digit-recognizer", input_size=(1, 28, 28), num_classes=10,
                          class_names=tuple("0123456789"), valid_acc=0.85)


def test_each_record_reads_back_as_it_was_written(tmp_path):
    run = RunDir(tmp_path)
    fold = run.fold(2)
    fold.root.mkdir()
    fold.write_history(EPOCHS)
    again = fold.read_history()
    assert again[1] == EPOCHS[1] and not again[0].validated and again[1].validated
    assert dataclasses.replace(again[0], valid_loss=0, valid_acc=0, valid_score=0) == dataclasses.replace(
        EPOCHS[0], valid_loss=0, valid_acc=0, valid_score=0)  # NaN, which equals nothing, came back NaN
    fold.write_result(RESULT)
    assert fold.read_result() == RESULT
    run.write_metrics(METRICS)
    assert run.read_metrics() == METRICS and run.finished_folds() == [2]
    fold.write_checkpoint({"w": torch.arange(6.0).reshape(2, 3)}, HEADER)
    assert fold.read_checkpoint() == HEADER and fold.read_checkpoint(load_spec("digit-recognizer")) == HEADER
    with pytest.raises(KaggleVitError, match=r"trained on \(1, 28, 28\) images with 10 classes, but cifar-10 has"):
        fold.read_checkpoint(load_spec("cifar-10"))
    rows, plain, views = np.array([3, 1]), np.eye(2, dtype=np.float32), np.full((2, 2), 0.5, dtype=np.float32)
    fold.write_valid_probs(rows, plain, views)
    for got, want in zip(fold.read_valid_probs(), (rows, plain, views)):
        np.testing.assert_array_equal(got, want)
    fold.write_test_probs(views)
    np.testing.assert_array_equal(fold.read_test_probs(), views)
    assert fold.problem() is None


def test_the_files_hold_one_name_per_quantity(tmp_path):
    run = RunDir(tmp_path)
    run.fold(2).root.mkdir()
    run.fold(2).write_result(RESULT)
    run.write_metrics(METRICS)
    result = json.loads(run.fold(2).result.read_text())
    assert (result["valid_acc"], result["valid_acc_views"]) == (0.85, 0.875) and "valid_acc_plain" not in result
    metrics = json.loads(run.metrics.read_text())
    assert (metrics["oof_acc"], metrics["oof_acc_views"], metrics["oof_loss_views"]) == (0.84, 0.86, 0.45)
    assert not [key for key in metrics if key.endswith("_plain")] and metrics["seed_ensemble"]["runs"] == ["runs/a", "runs/b"]


def _old_result(plain: float, views: float) -> dict:
    """result.json as kaggle-vit 9032e2c wrote it: `valid_acc` with the test-time views."""
    return {"fold": 2, "best_epoch": 2, "valid_acc": views, "tta": 3, "valid_acc_plain": plain, "valid_loss": 0.5,
            "metric": "accuracy", "valid_score": views, "valid_score_plain": plain, "train_seconds": 4.75,
            "predict_seconds": 0.5, "images_per_s": 305.25, "amp": "fp32", "device": "cpu", "epochs": 2,
            "pseudo_rows": 0}


def test_a_run_folder_of_the_old_names_reads_in_the_new(tmp_path):
    run = RunDir(tmp_path)
    fold = run.fold(2)
    fold.root.mkdir()
    fold.result.write_text(json.dumps(_old_result(plain=0.85, views=0.875)))
    assert fold.read_result() == RESULT
    old = {"competition": "digit-recognizer", "model": "kvit_pico_patch7_28", "class_names": list("0123456789"),
           "metric": "accuracy", "folds": [_old_result(0.85, 0.875)], "n_folds": 2, "oof_acc": 0.86, "oof_loss": 0.45,
           "oof_acc_plain": 0.84, "oof_score": 0.86, "oof_score_plain": 0.84, "tta": 3, "train_seconds": 9.5,
           "predict_seconds": 1.0, "version": "0.1.0", "git": "abc1234", "config": "seed = 42\n",
           "seed_runs": ["runs/a", "runs/b"], "seed_ensemble": {"oof_acc": 0.87, "oof_score": 0.87}}
    run.metrics.write_text(json.dumps(old))
    assert run.read_metrics() == dataclasses.replace(METRICS, folds=(RESULT,))
    rows, plain, views = np.array([3, 1]), np.eye(2, dtype=np.float32), np.full((2, 2), 0.5, dtype=np.float32)
    np.savez(fold.valid_probs, rows=rows, probs=views, probs_plain=plain)  # 9032e2c: `probs` with the views
    for got, want in zip(fold.read_valid_probs(), (rows, plain, views)):
        np.testing.assert_array_equal(got, want)


def test_a_damaged_record_is_one_line_naming_its_file(tmp_path):
    run = RunDir(tmp_path)
    run.fold(1).root.mkdir()
    run.fold(1).write_history(EPOCHS)
    pd.read_csv(run.fold(1).history).drop(columns="valid_acc").to_csv(run.fold(1).history, index=False)
    run.fold(1).result.write_text('{"fold": 1}')
    run.metrics.write_text("{")
    for read, path in ((run.fold(1).read_history, run.fold(1).history), (run.fold(1).read_result, run.fold(1).result),
                       (run.read_metrics, run.metrics)):
        with pytest.raises(KaggleVitError) as error:
            read()
        assert str(error.value).startswith(f"{path}: unreadable (") and str(error.value).endswith(
            "rerun `kaggle-vit cv` with the same settings to rewrite it")
    assert run.fold(1).problem() == f"{run.fold(1).result} is unreadable"
