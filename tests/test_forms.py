"""Submission forms, end to end on small real-MNIST competitions: a label, the second class's
probability (binary: odd digits, scored by ROC AUC), and one probability column per class
(scored by log loss); each form's bad submissions refused with one line."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.data.fetch import write_competition_files
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.metrics import EPS, clip_probs
from kaggle_vit.spec import bundled_dir, load_spec

runner = CliRunner()
TINY = """
[train]
model = "kvit_pico_patch7_28"
embed_dim = 32
depth = 2
num_heads = 2
epochs = 4
folds = 2
batch_size = 64
device = "cpu"
num_workers = 0
tta = 1
jobs = 1
"""
FORMS = {
    # form: (edits of digit-recognizer.toml, labels from the digit)
    "probability": ({'metric = "accuracy"': 'metric = "auc"\nsubmission_form = "probability"',
                     'num_classes = 10': 'num_classes = 2',
                     'names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]': 'names = ["even", "odd"]',
                     'submission = ["ImageId", "Label"]': 'submission = ["ImageId", "IsOdd"]'}, lambda y: y % 2),
    "class_probabilities": ({'metric = "accuracy"': 'metric = "logloss"\nsubmission_form = "class_probabilities"',
                             'submission = ["ImageId", "Label"]': 'submission = ["ImageId"]'}, lambda y: y),
}


def _spec_text(form: str) -> str:
    text = (bundled_dir() / "digit-recognizer.toml").read_text()
    for old, new in FORMS[form][0].items():
        assert old in text
        text = text.replace(old, new)
    return text.replace('name = "digit-recognizer"', f'name = "digits-{form}"')


@pytest.fixture(scope="module", params=list(FORMS))
def competition(request, tmp_path_factory, mnist):
    """A spec of the form, its 600/200-row competition, and a finished 2-fold run with its submission."""
    form = request.param
    root = tmp_path_factory.mktemp(form)
    spec_path = root / "spec.toml"
    spec_path.write_text(_spec_text(form))
    spec = dataclasses.replace(load_spec(spec_path), offline_split="official")
    relabel = FORMS[form][1]
    tx, ty, vx, vy = mnist
    write_competition_files(spec, root / "data", tx[:600], relabel(ty[:600]), vx[:200], relabel(vy[:200]))
    config = root / "tiny.toml"
    config.write_text(TINY)
    args = ["--competition", str(spec_path), "--data-dir", str(root / "data")]
    cv = runner.invoke(app, ["cv", *args, "--config", str(config), "--run-dir", str(root / "run"), "--quiet"])
    assert cv.exit_code == 0, cv.output
    sub = runner.invoke(app, ["submit", str(root / "run"), *args, "--output", str(root / "submission.csv")])
    assert sub.exit_code == 0, sub.output
    return form, spec, root, args


def test_submission_has_the_forms_columns_ids_and_values(competition):
    form, spec, root, _ = competition
    frame = pd.read_csv(root / "submission.csv")
    assert frame["ImageId"].tolist() == list(range(1, 201))
    if form == "probability":
        assert list(frame.columns) == ["ImageId", "IsOdd"]
        values = frame["IsOdd"].to_numpy()
    else:
        assert list(frame.columns) == ["ImageId", *[str(d) for d in range(10)]]
        values = frame.iloc[:, 1:].to_numpy()
        np.testing.assert_allclose(values.sum(1), 1, atol=1e-5)
    assert values.min() >= EPS and values.max() <= 1 - EPS


def test_score_is_scikit_learns_metric_of_the_submission(competition):
    form, spec, root, args = competition
    result = runner.invoke(app, ["score", str(root / "submission.csv"), *args, "--run-dir", str(root / "run")])
    assert result.exit_code == 0, result.output
    frame, truth = pd.read_csv(root / "submission.csv"), pd.read_csv(root / "data" / "solution.csv")
    if form == "probability":
        assert list(truth.columns) == ["ImageId", "IsOdd"]
        expected = roc_auc_score(truth["IsOdd"] == 1, frame["IsOdd"])  # the class number, as train.csv holds it
        assert expected > 0.6  # real digits: four epochs on 300 images already rank odd above even
    else:
        assert list(truth.columns) == ["ImageId", "label"]
        expected = log_loss(truth["label"], clip_probs(frame.iloc[:, 1:].to_numpy()), labels=np.arange(10))
    assert f"{spec.metric} {expected:.5f} on" in result.output.splitlines()[0], result.output


@pytest.mark.parametrize("damage,message", [
    ("text", r"row 3, column '(IsOdd|4)': 'abc' is not a probability \(a number from 0 to 1\)"),
    ("above one", r"row 5, column '(IsOdd|4)': '1.5' is not a probability \(a number from 0 to 1\)"),
    ("no column", r"row 0: columns \[.*\], expected \[.*\]"),
])
def test_a_bad_submission_of_the_form_is_one_line(competition, tmp_path, damage, message):
    form, spec, root, args = competition
    frame = pd.read_csv(root / "submission.csv").astype(object)
    column = frame.columns[1] if form == "probability" else "4"
    if damage == "text":
        frame.loc[2, column] = "abc"
    elif damage == "above one":
        frame.loc[4, column] = 1.5
    else:
        frame = frame.drop(columns=[column])
    frame.to_csv(tmp_path / "bad.csv", index=False)
    result = runner.invoke(app, ["score", str(tmp_path / "bad.csv"), *args, "--run-dir", str(root / "run")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"error: {tmp_path / 'bad.csv'}: " in result.output and __import__("re").search(message, result.output)


def test_forms_are_checked_when_the_spec_is_loaded(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(_spec_text("probability").replace("num_classes = 2", "num_classes = 10")
                   .replace('names = ["even", "odd"]', 'names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]')
                   .replace('metric = "auc"', 'metric = "accuracy"'))
    with pytest.raises(KaggleVitError, match=r"submission_form = 'probability' is for two classes, but num_classes = 10$"):
        load_spec(bad)
    bad.write_text(_spec_text("class_probabilities").replace('submission = ["ImageId"]', 'submission = ["ImageId", "Label"]'))
    with pytest.raises(KaggleVitError, match=r"submission must name the id column alone"):
        load_spec(bad)
    bad.write_text(_spec_text("class_probabilities").replace('"class_probabilities"', '"ranks"'))
    with pytest.raises(KaggleVitError, match=r"submission_form = 'ranks' must be one of label, probability, class_probabilities$"):
        load_spec(bad)
