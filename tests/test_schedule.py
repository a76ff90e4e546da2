"""The schedule in the data's terms (epochs, batch, learning rate and warm-up planned from the
training rows) and `--time-budget` (epochs fitted to a measured throughput, kept on resume)."""
import dataclasses
import json
import math
import re
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.run.cv import default_run_dir, run_cv
from kaggle_vit.run.settings import resolve_config
from kaggle_vit.spec import load_spec
from kaggle_vit.train import schedule
from kaggle_vit.train.schedule import (BUDGET_SHARE, MIN_BATCH, MIN_STEPS_PER_EPOCH, Throughput, Workload, fit_epochs,
                                       fold_rows, parse_duration, plan_schedule)

runner = CliRunner()
TINY = dict(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, folds=2, device="cpu", num_workers=0,
            tta=3, jobs=1)


@pytest.mark.parametrize("preset, rows, expected", [
    # (epochs, batch, lr, warm-up): a hundred images get many short epochs of small batches at a lower
    # rate and a longer warm-up; a million one epoch of the preset's batch
    ("cpu", 100, (300, 8, 1.41e-3, 9.0)),
    ("cpu", 10_000, (37, 64, 4e-3, 1.11)),
    ("cpu", 1_000_000, (1, 64, 4e-3, 0.5)),
    ("gpu", 100, (300, 8, 3.5e-4, 9.0)),
    ("gpu", 10_000, (101, 512, 2.8e-3, 3.03)),
    ("gpu", 1_000_000, (1, 512, 2.8e-3, 2.0)),
])
def test_the_schedule_is_planned_from_the_training_rows(preset, rows, expected):
    cfg, plan = plan_schedule(resolve_config(preset), rows)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_epochs) == expected
    assert (plan.epochs, plan.batch_size, plan.lr, plan.warmup_epochs) == expected
    # an epoch is never a handful of steps, unless the batch is already the smallest
    assert plan.steps_per_epoch >= MIN_STEPS_PER_EPOCH or plan.batch_size == MIN_BATCH


@pytest.mark.parametrize("rows, given, expected", [
    (80, {}, "resnet10t"),  # a hundred images: a small CNN
    (299, {}, "resnet10t"),
    (300, {}, "kvit_pico_patch4_28"),  # from SMALL_ROWS on, the ViT
    (33_600, {}, "kvit_pico_patch4_28"),
    (80, {"model": "kvit_pico_patch4_28"}, "kvit_pico_patch4_28"),  # a model given is kept
    (80, {"depth": 4}, "kvit_pico_patch4_28"),  # a ViT's setting asks for the ViT
    (80, {"drop_path_rate": 0.1}, "kvit_pico_patch4_28"),
])
def test_the_model_not_given_is_planned_from_the_training_rows(rows, given, expected):
    cfg = resolve_config(**given)
    assert cfg.model == given.get("model")  # not given: planned
    planned, plan = plan_schedule(cfg, rows)
    assert planned.model == expected
    assert plan.model == (None if "model" in given else expected)
    assert resolve_config("gpu").model == "kvit_small_patch4_28"  # a preset's model is given


@pytest.mark.parametrize("preset, fingerprint, expected", [("cpu", "3f0788e8", (11, 64, 4e-3, 0.5)),
                                                           ("gpu", "b3a216fa", (30, 512, 2.8e-3, 2.0))])
def test_digit_recognizers_defaults_resolve_to_the_recipes_and_run_folders_of_before(preset, fingerprint, expected):
    """42,000 rows in 5 folds train as the presets always did (their epochs, batch, rate and
    warm-up), so their run folders keep their names and resume."""
    cfg = resolve_config(preset)
    assert cfg.epochs is None and cfg.batch_size is None and cfg.lr is None  # not given: planned
    planned, plan = plan_schedule(cfg, fold_rows(42_000, 5))
    assert plan.rows == 33_600
    assert (planned.epochs, planned.batch_size, planned.lr, planned.warmup_epochs) == expected
    assert planned.fingerprint() == fingerprint
    assert default_run_dir(planned, load_spec("digit-recognizer")).name == f"{planned.model}-{fingerprint}"
    assert plan.line() == (f"33,600 training rows per fold: {expected[0]} epochs × {33_600 // expected[1]} steps of "
                           f"{expected[1]} = {expected[0] * (33_600 // expected[1]):,} steps (lr "
                           f"{'4e-3' if preset == 'cpu' else '2.8e-3'}, warm-up {expected[3]:g} epochs)")


def test_given_epochs_batch_size_and_lr_win(tmp_path):
    given = resolve_config(epochs=5, batch_size=128, lr=1e-3)
    assert plan_schedule(given, 800)[0].epochs == 5
    assert (plan_schedule(given, 800)[0].batch_size, plan_schedule(given, 800)[0].lr) == (128, 1e-3)
    # a given batch size alone: the rate follows it, the epochs are still the budget's
    cfg, _ = plan_schedule(resolve_config(batch_size=16), 800)
    assert (cfg.batch_size, cfg.lr, cfg.epochs) == (16, 2e-3, 300)
    # as given in a config file, and in a spec's [train] table
    (tmp_path / "run.toml").write_text("epochs = 7\nwarmup_epochs = 0.25\n")
    cfg, _ = plan_schedule(resolve_config(config_file=tmp_path / "run.toml"), 800)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size) == (7, 0.25, 32)
    spec = tmp_path / "spec.toml"
    spec.write_text(Path(load_spec("digit-recognizer").path).read_text() + "\n[train]\nbatch_size = 256\n")
    assert plan_schedule(resolve_config(competition=str(spec)), 800)[0].batch_size == 256
    # a time budget plans the epochs: both at once is one line
    with pytest.raises(KaggleVitError, match="--time-budget 600s plans the epochs: leave epochs out"):
        resolve_config(epochs=3, time_budget=600)


def test_durations_read_as_users_write_them():
    assert [parse_duration(t) for t in ("90s", "10m", "1.5h", "600", "0")] == [90, 600, 5400, 600, 0]
    with pytest.raises(KaggleVitError, match="--time-budget 'ten minutes': give a duration such as 90s, 10m or 1.5h"):
        parse_duration("ten minutes")


def _budget_config(seconds: float, **changes) -> tuple[TrainConfig, schedule.Plan]:
    """The cpu preset's config with a time budget, its schedule planned for 1,000 rows."""
    return plan_schedule(resolve_config(time_budget=seconds, **changes), 1000)


def test_the_budget_plan_fits_the_epochs_of_all_folds_into_the_time_left():
    cfg, plan = _budget_config(600, skip_easy=0.0, valid_every=0, tta=1)
    assert plan.epochs is None and cfg.epochs is None and cfg.batch_size == 32  # the batch is the rows'
    # 4 folds, 2 at a time: an epoch of 1,000 rows at 100 images/s is 10 s, a fold's validation and
    # test predictions (250 + 500 rows at 1,000 images/s) 0.75 s; so the run takes 20 s an epoch + 1.5 s
    work, rates = Workload(rows=1000, valid_rows=250, test_rows=500, folds=4, jobs=2), Throughput(100, 1000)
    fitted = fit_epochs(cfg, plan, work, rates, spent=10)
    assert fitted.epochs == math.floor(((600 - 10) * BUDGET_SHARE - 1.5) / 20)
    assert fitted.estimated_seconds == pytest.approx(10 + 20 * fitted.epochs + 1.5)
    assert fitted.warmup_epochs == max(0.5, round(0.03 * fitted.epochs, 2))
    assert (fitted.train_images_per_s, fitted.predict_images_per_s) == (100, 1000)
    assert "fitted to --time-budget 10m at 100 training images/s per fold" in fitted.line()
    # twice the throughput, or folds trained one at a time: about twice, or half, the epochs
    assert fit_epochs(cfg, plan, work, Throughput(200, 2000), spent=10).epochs in range(2 * fitted.epochs,
                                                                                      2 * fitted.epochs + 2)
    assert fit_epochs(cfg, plan, dataclasses.replace(work, jobs=1), rates, spent=10).epochs == fitted.epochs // 2
    # middle epochs that skip easy rows cost less: more of them fit
    easy, easy_plan = _budget_config(600, skip_easy=0.6, valid_every=0, tta=1)
    assert fit_epochs(easy, easy_plan, work, rates, spent=10).epochs > fitted.epochs
    # never more than the most epochs a schedule may have
    assert fit_epochs(cfg, plan, work, Throughput(1e9, 1e9), spent=0).epochs == schedule.MAX_EPOCHS


def test_a_budget_that_fits_no_epoch_is_one_line_with_the_estimate():
    cfg, plan = _budget_config(60, skip_easy=0.0, valid_every=0, tta=1)
    work = Workload(rows=1000, valid_rows=250, test_rows=500, folds=5, jobs=1)
    with pytest.raises(KaggleVitError) as error:
        fit_epochs(cfg, plan, work, Throughput(10, 100), spent=5)  # one epoch: 5 × (100 s + 7.5 s)
    message = str(error.value)
    assert message.startswith("--time-budget 60s: the shortest run, 1 epoch of each of 5 folds with their "
                              "predictions, needs about")
    need = 5 + 5 * 107.5 / BUDGET_SHARE
    assert f"needs about {schedule.format_duration(need)} here" in message
    assert f"give --time-budget {schedule.format_duration(60 * math.ceil(need / 60))} or more" in message


def test_a_resumed_run_keeps_its_plan_and_is_not_measured_again(small_comp, small_spec, tmp_path, monkeypatch):
    """A budget run measured once trains to that plan; resumed, it reads plan.json back, whatever
    a new measurement would say (here: a hundred times faster)."""
    data = load_competition(small_spec, small_comp)
    measured = []

    def fake_measure(cfg, data, folds, threads, teacher=None):
        measured.append(cfg.batch_size)
        return Throughput(30.0, 3000.0) if len(measured) == 1 else Throughput(3000.0, 300_000.0)

    monkeypatch.setattr(schedule, "measure", fake_measure)
    # 2 folds of 300 rows, 200 test rows, 3 views, every epoch validated: 20.2 s an epoch + 0.8 s at
    # the first rates, so about 50 s of budget left fit 2 epochs
    cfg = TrainConfig(**TINY, epochs=None, batch_size=None, lr=None, warmup_epochs=None, time_budget=51 / BUDGET_SHARE)
    run = tmp_path / "run"
    first = run_cv(cfg, data, run, only_folds=[1])
    saved = json.loads((run / "plan.json").read_text())
    assert first.plan.epochs == saved["epochs"] == 2 and saved["train_images_per_s"] == 30.0
    assert saved["rows"] == 300 and saved["batch_size"] == 16 and saved["time_budget"] == cfg.time_budget
    settings = tomllib.loads((run / "config.toml").read_text())  # as given: the budget, not its epochs
    assert settings["time_budget"] == cfg.time_budget and "epochs" not in settings and "warmup_epochs" not in settings
    second = run_cv(cfg, data, run)
    assert measured == [16] and second.complete and second.plan == first.plan  # measured once, at the planned batch
    assert json.loads((run / "plan.json").read_text()) == saved
    assert list(pd.read_csv(run / "fold2" / "history.csv")["epoch"]) == [1, 2]
    assert second.seconds > 0


def _tiny_toml(path: Path, **changes) -> Path:
    """The tiny model's settings, the schedule left to plan (no epochs, batch size, lr or warm-up)."""
    text = to_toml(TrainConfig(**TINY, **changes))
    path.write_text("\n".join(line for line in text.splitlines()
                              if line.split(" = ")[0] not in ("epochs", "batch_size", "lr", "warmup_epochs")))
    return path


def test_cv_prints_its_plan_before_the_first_step_and_the_budget_against_the_time_used(small_comp, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = _tiny_toml(tmp_path / "tiny.toml")
    result = runner.invoke(app, ["cv", "--config", str(tiny), "--data-dir", str(small_comp), "--epochs", "1",
                                 "--fold", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    plan = "300 training rows per fold: 1 epoch × 18 steps of 16 = 18 steps (lr 2e-3, warm-up 0.5 epochs)"
    assert plan in result.output.splitlines()
    assert result.output.index(plan) < result.output.index("fold 1: valid acc")  # before the fold trains
    assert "time budget" not in result.output

    # 2 folds of 300 rows, 200 test rows, 3 views: 20.2 s an epoch + 0.8 s at these rates; about 50 s fit 2 epochs
    monkeypatch.setattr(schedule, "measure", lambda cfg, data, folds, threads, teacher=None: Throughput(30.0, 3000.0))
    seconds = round(52 / BUDGET_SHARE)
    budget = runner.invoke(app, ["cv", "--config", str(tiny), "--data-dir", str(small_comp), "--time-budget",
                                 f"{seconds}s", "--fold", "1", "--quiet"])
    assert budget.exit_code == 0, budget.output
    assert ("300 training rows per fold: 2 epochs × 18 steps of 16 = 36 steps (lr 2e-3, warm-up 0.5 epochs), "
            f"fitted to --time-budget {seconds}s at 30 training images/s per fold") in budget.output
    runs = sorted((tmp_path / "runs" / "digit-recognizer").glob("kvit_*"))
    assert len(runs) == 2 and all((r / "plan.json").exists() for r in runs)  # a budget run has its own folder
    assert re.search(rf"^time budget {seconds}s: \d+s used \(\d+%; 2 epochs planned for about \d+s\)$", budget.output,
                     re.MULTILINE), budget.output


def test_a_budget_too_small_is_one_line_before_anything_is_written(small_comp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = _tiny_toml(tmp_path / "tiny.toml")
    monkeypatch.setattr(schedule, "measure", lambda cfg, data, folds, threads, teacher=None: Throughput(3.0, 300.0))
    result = runner.invoke(app, ["cv", "--config", str(tiny), "--data-dir", str(small_comp), "--time-budget", "30s"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --time-budget 30s: the shortest run, 1 epoch of each of 2 "
                                                   "folds with their predictions, needs about"), result.output
    assert not list(tmp_path.glob("runs/*/kvit_*"))  # no run folder
    both = runner.invoke(app, ["cv", "--config", str(tiny), "--data-dir", str(small_comp), "--time-budget", "10m",
                               "--epochs", "3"])
    assert both.exit_code == 2 and "plans the epochs: leave epochs out" in both.output


def test_cv_on_a_few_hundred_images_trains_the_small_cnn_and_says_so(small_spec, mnist, tmp_path, monkeypatch):
    from conftest import build_small

    data = build_small(tmp_path / "data", small_spec, mnist, 200, 50)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cv", "--data-dir", str(data), "--folds", "2", "--epochs", "1", "--quiet",
                                 "--set", "tta=1", "--set", "device=cpu"])
    assert result.exit_code == 0, result.output
    assert ("note: 100 training rows per fold: the model is resnet10t, a small CNN, which learns more than a ViT from "
            "so few images (--model kvit_pico_patch4_28 trains the ViT)") in result.output
    runs = [p.name.split("-")[0] for p in (tmp_path / "runs" / "digit-recognizer").iterdir()]
    assert sorted(runs) == ["folds", "resnet10t"]  # the competition's shared fold split, and the run
