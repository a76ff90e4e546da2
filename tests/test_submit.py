import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.models.checkpoint import checkpoint_header, save_checkpoint
from kaggle_vit.report import attention_rollout, make_report
from kaggle_vit.run.cv import run_cv
from kaggle_vit.run.rundir import read_checkpoint
from kaggle_vit.submit import make_submission

runner = CliRunner()
TINY = dict(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, epochs=2, batch_size=64, folds=2,
            device="cpu", num_workers=0, tta=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_comp, small_spec):
    """A finished 2-fold run on the small competition, in a runs/ tree like the CLI makes."""
    root = tmp_path_factory.mktemp("work")
    data_dir = root / "data" / "digit-recognizer"
    shutil.copytree(small_comp, data_dir)
    run = root / "runs" / "digit-recognizer" / "tiny"
    run_cv(TrainConfig(**TINY), load_competition(small_spec, data_dir), run)
    return root, run


def test_submission_is_the_fold_mean(trained, small_spec, tmp_path):
    root, run = trained
    data = load_competition(small_spec, root / "data" / "digit-recognizer")
    sub = make_submission(run, data, tmp_path / "sub.csv")
    expected = (np.load(run / "fold1" / "test_probs.npy") + np.load(run / "fold2" / "test_probs.npy")) / 2
    frame = pd.read_csv(tmp_path / "sub.csv")
    assert list(frame.columns) == ["ImageId", "Label"] and frame["ImageId"].tolist() == list(range(1, 201))
    assert np.array_equal(frame["Label"].to_numpy(), expected.argmax(1))
    assert sub.folds == [1, 2] and sum(sub.class_counts.values()) == 200
    one = make_submission(run, data, tmp_path / "one.csv", folds=[2], weighting="oof", tta=3)
    assert one.folds == [2] and one.weights == [1.0]
    assert np.allclose(one.probs.sum(1), 1, atol=1e-4)
    assert not np.allclose(one.probs, np.load(run / "fold2" / "test_probs.npy"))  # recomputed with 3 views
    again = make_submission(run, data, tmp_path / "again.csv", folds=[2], tta=TINY["tta"])
    assert np.allclose(again.probs, np.load(run / "fold2" / "test_probs.npy"), atol=1e-5)  # the saved views


def test_a_checkpoint_header_is_the_checkpoint_without_its_tensors(trained):
    _, run = trained
    path = run / "fold1" / "model.safetensors"
    full, header = read_checkpoint(run, 1), checkpoint_header(path)
    assert {k: v for k, v in full.items() if k != "state_dict"} == header
    assert header["model"] == TINY["model"] and header["input_size"] == (1, 28, 28) and header["num_classes"] == 10
    assert set(full["state_dict"]) == set(load_file(path)) and "pos_embed" in full["state_dict"]


def test_refuses_missing_fold_and_other_shapes(trained, small_spec, tmp_path):
    root, run = trained
    data = load_competition(small_spec, root / "data" / "digit-recognizer")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "fold2" / "result.json").unlink()
    with pytest.raises(KaggleVitError, match=r"fold\(s\) \[2\] not finished"):
        make_submission(broken, data, tmp_path / "never.csv")
    assert not (tmp_path / "never.csv").exists()
    assert make_submission(broken, data, tmp_path / "fewer.csv", allow_missing=True).folds == [1]
    ckpt = read_checkpoint(broken, 1)
    save_checkpoint(broken / "fold1" / "model.safetensors", ckpt.pop("state_dict"), {**ckpt, "num_classes": 47})
    with pytest.raises(KaggleVitError, match="with 47 classes"):
        make_submission(broken, data, tmp_path / "never.csv", allow_missing=True)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.drop(index=5), "199 rows, expected 200; id 6 is missing"),
    (lambda f: f.assign(ImageId=f["ImageId"].where(f.index != 3, 2)), "row 4, column 'ImageId': duplicate id 2"),
    (lambda f: f.assign(Label=f["Label"].where(f.index != 7, 10)), "row 8, column 'Label': label '10' is not one of the 10 classes (0, 1, 2, 3, 4, ...)"),
])
def test_score_refuses_bad_submissions(trained, tmp_path, monkeypatch, edit, message):
    root, run = trained
    monkeypatch.chdir(root)
    assert runner.invoke(app, ["submit", str(run), "-o", str(tmp_path / "ok.csv")]).exit_code == 0
    good = runner.invoke(app, ["score", str(tmp_path / "ok.csv")])
    assert good.exit_code == 0 and "accuracy" in good.output and "fold 1:" in good.output
    edit(pd.read_csv(tmp_path / "ok.csv")).to_csv(tmp_path / "bad.csv", index=False)
    bad = runner.invoke(app, ["score", str(tmp_path / "bad.csv")])
    assert bad.exit_code == 2 and message in bad.output and "bad.csv" in bad.output


def test_score_matches_solution(trained, tmp_path, monkeypatch):
    root, run = trained
    monkeypatch.chdir(root)
    runner.invoke(app, ["submit", "-o", str(tmp_path / "s.csv")])
    truth = pd.read_csv(root / "data" / "digit-recognizer" / "solution.csv")
    truth.to_csv(tmp_path / "perfect.csv", index=False)
    result = runner.invoke(app, ["score", str(tmp_path / "perfect.csv")])
    assert result.exit_code == 0 and "100.000%" in result.output


def test_report_writes_valid_pngs(trained, small_spec, monkeypatch):
    root, run = trained
    data = load_competition(small_spec, root / "data" / "digit-recognizer")
    written = make_report(run, data, n_images=12, n_attention=4)
    names = {p.name for p in written}
    assert names == {"curves.png", "test_predictions.png", "confusion.png", "mistakes.png", "attention.png"}
    for path in written:
        with Image.open(path) as img:
            img.verify()
        assert Image.open(path).size[0] > 300


def test_attention_rollout_is_a_distribution():
    maps = [torch.softmax(torch.randn(2, 3, 17, 17), -1) for _ in range(4)]
    roll = attention_rollout(maps)
    assert roll.shape == (2, 16) and torch.all(roll > 0) and torch.all(roll.sum(1) < 1)
