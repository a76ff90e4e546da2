import dataclasses
import json
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
from kaggle_vit.run.rundir import RunDir
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
    header, model = RunDir(run).fold(1).read_checkpoint(), RunDir(run).fold(1).read_model()
    assert header == checkpoint_header(path) and header.fold == 1
    assert header.model == TINY["model"] and header.input_size == (1, 28, 28) and header.num_classes == 10
    assert set(model.state_dict()) == set(load_file(path)) and "pos_embed" in load_file(path)


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
    path = broken / "fold1" / "model.safetensors"
    save_checkpoint(path, load_file(path), dataclasses.replace(checkpoint_header(path), num_classes=47))
    with pytest.raises(KaggleVitError, match="with 47 classes"):
        make_submission(broken, data, tmp_path / "never.csv", allow_missing=True)


def _set(path, **entries) -> dict:
    """Rewrite the JSON file `path` with `entries` set; return what it held."""
    held = json.loads(path.read_text())
    path.write_text(json.dumps({**held, **entries}))
    return held


def test_oof_weighting_uses_each_fold_accuracy_with_the_test_time_views(trained, small_spec, tmp_path):
    """`submit --weighting oof` weights a fold model by the accuracy of what it averages: its test
    probabilities under the run's test-time views, so by `valid_acc_views`, not the plain `valid_acc`."""
    root, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _set(copy / "fold1" / "result.json", valid_acc=0.5, valid_acc_views=0.9)
    _set(copy / "fold2" / "result.json", valid_acc=0.8, valid_acc_views=0.6)
    data = load_competition(small_spec, root / "data" / "digit-recognizer")
    assert make_submission(copy, data, tmp_path / "sub.csv", weighting="oof").weights == pytest.approx([0.6, 0.4])


def _old_names(entries: dict, names: tuple[str, ...]) -> dict:
    """A record as kaggle-vit 9032e2c named its entries: NAME with the test-time views, NAME_plain without."""
    old = {k: v for k, v in entries.items() if not k.endswith("_views")}
    for name in names:
        old[name], old[f"{name}_plain"] = entries[f"{name}_views"], entries[name]
    return old


def test_a_run_folder_of_the_old_names_resumes_and_is_used_by_its_quantity_with_views(trained, small_spec, tmp_path,
                                                                                     monkeypatch):
    """A run folder written by 9032e2c: cv resumes it without training a fold again (and rewrites
    metrics.json in today's names, the same scores), submit weights by each fold's accuracy with the
    views, score shows the OOF accuracy with them."""
    root, run = trained
    old = tmp_path / "old"
    shutil.copytree(run, old)
    results = []
    for k, (plain, views) in ((1, (0.5, 0.9)), (2, (0.8, 0.6))):
        fold = old / f"fold{k}"
        result = {**json.loads((fold / "result.json").read_text()), "valid_acc": plain, "valid_acc_views": views}
        results.append(_old_names(result, ("valid_acc", "valid_score")))
        (fold / "result.json").write_text(json.dumps(results[-1]))
        with np.load(fold / "valid_probs.npz") as z:
            rows, probs, probs_views = z["rows"], z["probs"], z["probs_views"]
        np.savez(fold / "valid_probs.npz", rows=rows, probs=probs_views, probs_plain=probs)
    metrics = json.loads((old / "metrics.json").read_text())
    shown = {**metrics, "oof_acc": 0.1234, "oof_acc_views": 0.9123, "folds": results, "oof_loss": metrics["oof_loss_views"]}
    del shown["oof_loss_views"], shown["seed_ensemble"]
    (old / "metrics.json").write_text(json.dumps(_old_names(shown, ("oof_acc", "oof_score"))))
    data_dir = root / "data" / "digit-recognizer"
    data = load_competition(small_spec, data_dir)
    assert make_submission(old, data, tmp_path / "sub.csv", weighting="oof").weights == pytest.approx([0.6, 0.4])
    monkeypatch.chdir(tmp_path)
    scored = runner.invoke(app, ["score", str(tmp_path / "sub.csv"), "--run-dir", str(old), "--data-dir", str(data_dir)])
    assert scored.exit_code == 0 and f"OOF accuracy of {old}: 91.230% (2 folds)" in scored.output, scored.output
    resumed = run_cv(TrainConfig(**TINY), data, old)
    assert resumed.trained == [] and resumed.metrics.folds[0].valid_acc_views == 0.9
    assert (resumed.metrics.oof_acc, resumed.metrics.oof_acc_views) == (metrics["oof_acc"], metrics["oof_acc_views"])
    assert json.loads((old / "metrics.json").read_text())["oof_acc_views"] == metrics["oof_acc_views"]


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
