"""Distillation (`cv --set teacher=RUN`): fold K's student learns from the teacher run's fold K
model, which never trained on fold K's validation rows; it sees the student's own batches in its
own input form; a teacher that cannot teach this run is refused in one line before anything is written."""
import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import TINY as TINY_SETTINGS

import kaggle_vit.run.fold as fold_module
from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, validate_config
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.models.factory import create_model
from kaggle_vit.run.cv import run_cv
from kaggle_vit.train.dataset import DataConfig, ImageDataset
from kaggle_vit.train.distill import Teacher, convert, distill_loss
from kaggle_vit.train.engine import fit, predict_probs
from kaggle_vit.train.device import inference_amp

runner = CliRunner()
TINY = TrainConfig(**{**TINY_SETTINGS, "epochs": 1, "tta": 1})  # the student; its folds are the teacher's


@pytest.fixture
def teacher_run(finished):
    """A finished 2-fold run of the small competition to distil from (read only)."""
    return finished[0]


def test_a_batch_converted_between_normalisations_equals_one_prepared_for_the_target():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    kvit = DataConfig((3, 8, 8), (0.5,), (0.5,))
    imagenet = DataConfig((3, 16, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(convert(kvit.prepare(images.clone()), kvit, imagenet), imagenet.prepare(images.clone()),
                               atol=1e-4, rtol=1e-4)


def test_hard_distillation_is_cross_entropy_on_the_teachers_top_class_and_soft_is_zero_at_agreement():
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    torch.testing.assert_close(distill_loss(student, teacher, "hard", 1.0),
                               nn.functional.cross_entropy(student, teacher.argmax(1), reduction="none"))
    assert distill_loss(teacher, teacher, "soft", 2.0).abs().max() < 1e-5
    assert (distill_loss(student, teacher, "soft", 2.0) > 0).all()


class Always(nn.Module):
    """A teacher that is sure of one class, whatever the image."""

    def __init__(self, cls: int, classes: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.full((classes,), -10.0).index_fill_(0, torch.tensor(cls), 10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_a_student_taught_only_by_a_teacher_learns_the_teachers_answers_not_the_labels(kind, small_comp, small_spec):
    data = load_competition(small_spec, small_comp)
    cfg = dataclasses.replace(TINY, epochs=3, lr=3e-3, warmup_epochs=0.0)
    model = create_model(cfg, small_spec)
    student = DataConfig((1, 28, 28))
    train = ImageDataset(data.train.images, data.train.labels[:400], data_config=student, rows=np.arange(400))
    valid = ImageDataset(data.train.images, data.train.labels[400:], data_config=student, rows=np.arange(400, 600))
    teacher = Teacher(Always(3), student, DataConfig((1, 28, 28), (0.1307,), (0.3081,)), kind, alpha=1.0)
    fit(model, train, valid, cfg, seed=0, teacher=teacher)
    probs = predict_probs(model, valid, torch.device("cpu"), inference_amp("off", torch.device("cpu")))
    assert (probs.argmax(1) == 3).mean() > 0.9  # the labels (ten classes) had no weight


def test_fold_k_learns_from_the_teacher_runs_fold_k_model(small_comp, small_spec, teacher_run, tmp_path, monkeypatch):
    data = load_competition(small_spec, small_comp)
    taught = {}
    real_fit = fold_module.fit

    def spy(model, train, valid, cfg, **kwargs):
        teacher = kwargs["teacher"]
        taught[len(taught) + 1] = (teacher.model.state_dict(), np.asarray(valid.labels).copy())
        return real_fit(model, train, valid, cfg, **kwargs)

    monkeypatch.setattr(fold_module, "fit", spy)
    result = run_cv(dataclasses.replace(TINY, teacher=str(teacher_run), distill="soft"), data, tmp_path / "run")
    assert result.complete
    from safetensors.torch import load_file

    folds = pd.read_csv(teacher_run / "folds.csv")["fold"].to_numpy()
    np.testing.assert_array_equal(folds, pd.read_csv(tmp_path / "run" / "folds.csv")["fold"].to_numpy())
    for k in (1, 2):
        weights, valid_labels = taught[k]
        own = load_file(teacher_run / f"fold{k}" / "model.safetensors")  # trained without fold k's rows
        assert all(torch.equal(weights[name], own[name]) for name in own)
        np.testing.assert_array_equal(valid_labels, data.train.labels[folds == k])


def test_a_teacher_that_cannot_teach_this_run_is_one_line_before_anything_is_written(small_comp, small_spec,
                                                                                      teacher_run, tmp_path):
    data = load_competition(small_spec, small_comp)
    cases = {"missing": (tmp_path / "nope", "teacher .*: not a cv run folder"),
             "other folds": (teacher_run, "teacher .*: its folds differ from this run's")}
    for name, (path, message) in cases.items():
        cfg = dataclasses.replace(TINY, teacher=str(path), seed=7 if name == "other folds" else TINY.seed)
        with pytest.raises(KaggleVitError, match=message):
            run_cv(cfg, data, tmp_path / name)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob("folds-*.csv"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher_run, unfinished)
    (unfinished / "fold2" / "model.safetensors").unlink()
    with pytest.raises(KaggleVitError, match="teacher .*: fold 2 is not finished"):
        run_cv(dataclasses.replace(TINY, teacher=str(unfinished)), data, tmp_path / "run")
    one = run_cv(dataclasses.replace(TINY, teacher=str(unfinished)), data, tmp_path / "run", only_folds=[1])
    assert one.trained == [1]  # `cv --fold 1` needs the teacher's fold 1 only
    with pytest.raises(KaggleVitError, match=r"distill_alpha is the teacher's share"):
        validate_config(dataclasses.replace(TINY, distill_alpha=0.0))


def test_cli_distils_with_set_teacher_and_refuses_another_split_with_exit_2(small_comp, teacher_run, tmp_path):
    base = ["cv", "--data-dir", str(small_comp), "--folds", "2", "--epochs", "1", "--quiet", "--set",
            "model=kvit_pico_patch7_28", "--set", "embed_dim=32", "--set", "depth=2", "--set", "num_heads=2",
            "--set", "tta=1", "--set", "device=cpu", "--set", f"teacher={teacher_run}"]
    bad = runner.invoke(app, base + ["--run-dir", str(tmp_path / "bad"), "--set", "seed=9"])
    assert bad.exit_code == 2 and bad.output.strip().count("\n") == 0, bad.output
    assert "its folds differ" in bad.output and not (tmp_path / "bad").exists()
    good = runner.invoke(app, base + ["--run-dir", str(tmp_path / "good")])
    assert good.exit_code == 0, good.output
    assert (tmp_path / "good" / "oof.csv").is_file()


def test_a_time_budget_measures_the_steps_with_the_teachers_forward_passes(small_comp, small_spec):
    from kaggle_vit.train.schedule import PROBE_STEPS, measure

    data = load_competition(small_spec, small_comp)
    teacher_model = Always(3)
    calls = []
    teacher_model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    folds = np.arange(len(data.train.labels)) % 2 + 1
    cfg = dataclasses.replace(TINY, batch_size=8, epochs=1, warmup_epochs=0.0, lr=1e-3)
    measure(cfg, data, folds, 1, teacher=lambda student: Teacher(teacher_model, student, student))
    assert len(calls) >= PROBE_STEPS  # every timed step paid the teacher's forward pass
