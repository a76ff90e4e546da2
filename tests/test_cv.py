import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from conftest import PoolSpy
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.report import plot_run_curves
from kaggle_vit.run.cv import default_run_dir, run_cv
from kaggle_vit.run.jobs import Segment, plan_costs, plan_segments
from kaggle_vit.run.rundir import RunDir
from kaggle_vit.run.settings import resolve_config

runner = CliRunner()
TINY = dict(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, epochs=1, batch_size=64,
            folds=2, device="cpu", num_workers=0, tta=3)


@pytest.fixture
def tiny_toml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(TrainConfig(**TINY)))
    return path


def test_fold_loop_writes_every_artifact(small_comp, small_spec, tmp_path):
    data = load_competition(small_spec, small_comp)
    run = tmp_path / "run"
    result = run_cv(TrainConfig(**TINY), data, run)
    assert result.complete and result.trained == [1, 2] and 0.0 <= result.metrics.oof_acc <= 1.0
    for name in ("config.toml", "folds.csv", "oof.csv", "metrics.json"):
        assert (run / name).is_file(), name
    for k in (1, 2):
        for name in ("model.safetensors", "history.csv", "test_probs.npy", "valid_probs.npz", "result.json"):
            assert (run / f"fold{k}" / name).is_file(), name
        assert not (run / f"fold{k}" / "state.pt").exists()
        assert np.load(run / f"fold{k}" / "test_probs.npy").shape == (200, 10)
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 600 and set(oof["fold"]) == {1, 2}
    assert np.isclose((oof["pred"] == oof["label"]).mean(), result.metrics.oof_acc_views)  # the run's predictor
    assert np.allclose(oof[[f"prob_{c}" for c in range(10)]].sum(axis=1), 1, atol=1e-4)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["oof_acc_views"] == result.metrics.oof_acc_views and len(metrics["folds"]) == 2
    # OOF is scored with the run's test-time views; the plain score (one view) is kept beside it.
    plain = np.zeros(600, dtype=int)
    for k in (1, 2):
        with np.load(run / f"fold{k}" / "valid_probs.npz") as z:
            assert z["probs"].shape == z["probs_views"].shape and not np.allclose(z["probs"], z["probs_views"])
            plain[z["rows"]] = z["probs"].argmax(1)
    assert np.isclose(metrics["oof_acc"], (plain == oof["label"]).mean()) and metrics["tta"] == 3
    # one name per quantity: each fold's `valid_acc` is plain in result.json as in history.csv and the
    # checkpoint, `valid_acc_views` is with the views; here the views change some predictions
    differ = []
    for k in (1, 2):
        result = json.loads((run / f"fold{k}" / "result.json").read_text())
        best = pd.read_csv(run / f"fold{k}" / "history.csv")["valid_acc"][result["best_epoch"] - 1]
        assert result["valid_acc"] == best == RunDir(run).fold(k).read_checkpoint().valid_acc
        with np.load(run / f"fold{k}" / "valid_probs.npz") as z:
            truth = data.train.labels[z["rows"]]
            assert np.isclose(result["valid_acc"], (z["probs"].argmax(1) == truth).mean())
            assert result["valid_acc_views"] == (z["probs_views"].argmax(1) == truth).mean()
        differ.append(result["valid_acc"] != result["valid_acc_views"])
    assert any(differ)
    assert Image.open(plot_run_curves(run)).size[0] > 400 and (run / "curves.png").is_file()  # what cv's CLI draws
    # The saved config reproduces the run.
    assert resolve_config(config_file=run / "config.toml") == TrainConfig(**TINY)


def test_resume_skips_finished_folds(small_comp, small_spec, tmp_path, monkeypatch):
    data = load_competition(small_spec, small_comp)
    run = tmp_path / "run"
    first = run_cv(TrainConfig(**TINY), data, run, only_folds=[1])
    assert not first.complete and first.trained == [1]
    before = (run / "fold1" / "model.safetensors").read_bytes()
    second = run_cv(TrainConfig(**TINY), data, run)
    assert second.trained == [2] and second.complete
    assert (run / "fold1" / "model.safetensors").read_bytes() == before

    with pytest.raises(KaggleVitError, match="other settings"):
        run_cv(TrainConfig(**{**TINY, "lr": 0.1}), data, run)
    # every setting that changes results counts (test-time views, MLP width), not where the run goes
    with pytest.raises(KaggleVitError, match=r"other settings \(mlp_ratio, tta\)"):
        run_cv(TrainConfig(**{**TINY, "tta": 1, "mlp_ratio": 2.0}), data, run)
    assert run_cv(TrainConfig(**{**TINY, "jobs": 1, "eval_batch_size": 64}), data, run).trained == []


def test_a_fold_trains_the_same_alone_or_after_others(small_comp, small_spec, tmp_path):
    # --fold 2 on another machine, or fold 2 after a resume, must equal fold 2 of one full run.
    data = load_competition(small_spec, small_comp)
    run_cv(TrainConfig(**TINY, jobs=1), data, tmp_path / "all")
    run_cv(TrainConfig(**TINY, jobs=1), data, tmp_path / "alone", only_folds=[2])
    probs = [np.load(tmp_path / d / "fold2" / "test_probs.npy") for d in ("all", "alone")]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)


def test_parallel_folds_train_as_in_one_process(small_comp, small_spec, tmp_path, caplog, monkeypatch):
    # A pool of two processes (one thread each, as --jobs 2 gives on two cores) trains each fold
    # exactly as this process does with one thread: same probabilities, every artifact, OOF scored.
    # Three folds on two processes: fold 2 is cut between them, its second epoch taken over from
    # its state file, silently (a planned hand-over is no resume to report).
    data = load_competition(small_spec, small_comp)
    cfg = TrainConfig(**{**TINY, "folds": 3, "epochs": 2})
    folds = np.arange(len(data.train.labels)) % 3 + 1
    plan = plan_segments([1, 2, 3], 2, 2, *plan_costs(data, folds, cfg))
    assert plan == [[Segment(1, 1, 2), Segment(2, 2, 2)], [Segment(2, 1, 1), Segment(3, 1, 2)]]
    spy = PoolSpy(monkeypatch)
    with caplog.at_level("WARNING", logger="kaggle_vit"):
        parallel = run_cv(dataclasses.replace(cfg, jobs=2), data, tmp_path / "parallel")
    assert parallel.complete and parallel.trained == [1, 2, 3]
    assert [pool["size"] for pool in spy.pools] == [2]
    assert sorted(spy.tasks) == sorted((s,) for plan_ in plan for s in plan_)  # every segment, once
    assert not [r for r in caplog.records if "resuming" in r.getMessage()]
    history = pd.read_csv(tmp_path / "parallel" / "fold2" / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert not list((tmp_path / "parallel").glob(".arrays-*"))  # the workers' private folder is gone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cv(dataclasses.replace(cfg, jobs=1), data, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    for name in ("test_probs.npy",):
        for k in (1, 2, 3):
            a, b = (np.load(tmp_path / d / f"fold{k}" / name) for d in ("parallel", "one"))
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert parallel.metrics.oof_acc_views == json.loads((tmp_path / "one" / "metrics.json").read_text())["oof_acc_views"]


def test_a_failing_worker_is_reported_with_its_fold(small_comp, small_spec, tmp_path):
    data = load_competition(small_spec, small_comp)
    with pytest.raises(KaggleVitError, match=r"^fold 1: epoch 1: the loss became nan"):
        run_cv(TrainConfig(**{**TINY, "lr": 1e9, "grad_clip": 1e9, "jobs": 2}), data, tmp_path / "bad")


@pytest.mark.slow
def test_cli_cv_quiet(small_comp, tiny_toml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "plain.toml"  # timm's vit_tiny at its own width and depth, only reshaped to 28x28
    plain.write_text(to_toml(TrainConfig(epochs=1, folds=2, device="cpu", num_workers=0)))
    result = runner.invoke(app, ["cv", "--config", str(plain), "--data-dir", str(small_comp), "--quiet",
                                 "--model", "vit_tiny_patch16_224"])
    assert result.exit_code == 0, result.output
    assert "OOF accuracy" in result.output
    runs = list((tmp_path / "runs" / "digit-recognizer").glob("vit_tiny_patch16_224-*"))
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists()
    fold = RunDir(runs[0]).fold(1)
    assert fold.read_checkpoint().kwargs["patch_size"] == 4 and fold.read_model().pos_embed.shape == (1, 50, 192)
    bad = runner.invoke(app, ["cv", "--config", str(tiny_toml), "--data-dir", str(small_comp), "--fold", "7"])
    assert bad.exit_code == 2 and "folds are numbered 1..2" in bad.output


def test_cv_seeds_then_submit_averages_every_seed(small_comp, small_spec, tiny_toml, tmp_path, monkeypatch):
    """`cv --seeds 2` makes the runs `--set seed=42` and `--set seed=43` make, scores their OOF ensemble,
    and a bare `submit` then averages all four fold models."""
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(tiny_toml), "--data-dir", str(small_comp)]
    result = runner.invoke(app, ["cv", *args, "--seeds", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    runs = [default_run_dir(TrainConfig(**{**TINY, "seed": s}), small_spec) for s in (42, 43)]
    assert sorted((tmp_path / "runs" / "digit-recognizer").glob("kvit_*")) == sorted(tmp_path / r for r in runs)
    oofs = [pd.read_csv(r / "oof.csv") for r in runs]
    probs = sum(o.filter(like="prob_").to_numpy() for o in oofs) / 2
    ensemble = (probs.argmax(1) == oofs[0]["label"].to_numpy()).mean()
    assert f"seed ensemble (2 runs): OOF accuracy {100 * ensemble:.2f}%" in result.output
    sub = runner.invoke(app, ["submit", "--data-dir", str(small_comp)])
    assert sub.exit_code == 0, sub.output
    expected = sum(np.load(r / f"fold{k}" / "test_probs.npy") for r in runs for k in (1, 2)) / 4
    assert np.array_equal(pd.read_csv("submission.csv")["Label"].to_numpy(), expected.argmax(1))
    assert all(f"{r.name}/fold2: 0.250" in " ".join(sub.output.split()) for r in runs)
    for bad, message in ((["--run-dir", "x"], "--run-dir names one run"), (["--set", f"pseudo={runs[0]}"], "pseudo with --seeds")):
        refused = runner.invoke(app, ["cv", *args, "--seeds", "2", *bad])
        assert refused.exit_code == 2 and message in refused.output


def test_a_setting_added_later_keeps_run_folders_named_as_before_while_it_is_off():
    """Runs of these settings (the cpu preset of commit 3095d34) were named ...-3f32d7b6 before
    `skip_easy` existed: `--epochs 6 --set skip_easy=0` still finds, and resumes, that folder; turning
    the setting on names a new one."""
    assert TrainConfig().fingerprint() == "3f32d7b6"
    assert TrainConfig(skip_easy=0.5).fingerprint() != "3f32d7b6"
