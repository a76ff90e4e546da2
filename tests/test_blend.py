"""Blends fitted on OOF probabilities (`submit --weighting fit`): the weights, the blend against its
members, a noise member left out, a nested check that never sees the rows it scores, and the
command end to end on two tiny runs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import TINY, invoke, one_line, runner
from kaggle_vit import blend
from kaggle_vit.blend import fit_blend
from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.metrics import get_metric
from kaggle_vit.spec import load_spec
from kaggle_vit.submit import make_submission, read_submission

N_ROWS, N_CLASSES = 3000, 5


def _members(*strengths: float, noise: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Members' probabilities (members, rows, classes) of known labels: each a softmax of Gaussian
    logits with `strength` added to the true class; `noise`: one more member that ignores the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, N_ROWS)
    members = []
    for strength in strengths:
        logits = rng.normal(size=(N_ROWS, N_CLASSES))
        logits[np.arange(N_ROWS), labels] += strength
        members.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    if noise:
        members.append(rng.dirichlet(np.ones(N_CLASSES), N_ROWS))
    return np.stack(members), labels


FOLD_OF_ROW = np.arange(N_ROWS) % 5 + 1


@pytest.mark.parametrize("metric", ["accuracy", "logloss", "f1_macro"])
@pytest.mark.parametrize("method", ["hill", "stack"])
def test_weights_are_a_simplex_and_hill_climbing_beats_its_best_member(metric, method):
    members, labels = _members(2.0, 1.6, 1.2)
    fit, _ = fit_blend(members, labels, FOLD_OF_ROW, get_metric(metric), method)
    assert min(fit.weights) >= 0 and sum(fit.weights) == pytest.approx(1)
    assert fit.rows == N_ROWS and len(fit.member_scores) == 3
    best = min(fit.member_scores) if metric == "logloss" else max(fit.member_scores)
    if method == "hill":  # a climb starts from the best member and only ever improves on it
        assert not get_metric(metric).better(best, fit.score)
    if metric == "accuracy":  # three members of independent errors: a blend of them beats each
        assert fit.score > best and fit.nested_score > best


def test_log_loss_is_climbed_downwards():
    members, labels = _members(2.0, 1.9)
    fit, _ = fit_blend(members, labels, FOLD_OF_ROW, get_metric("logloss"), "hill")
    assert fit.score < min(fit.member_scores) and 0 < fit.weights[1] < 1


def test_a_noise_member_gets_no_weight():
    members, labels = _members(2.0, 1.6, noise=True)
    hill, blended = fit_blend(members, labels, FOLD_OF_ROW, get_metric("accuracy"), "hill")
    assert hill.weights[2] == 0 and hill.weights[0] > 0
    assert np.allclose(blended(members), np.tensordot(hill.weights, members, axes=1))
    stack, _ = fit_blend(members, labels, FOLD_OF_ROW, get_metric("accuracy"), "stack")
    assert stack.weights[2] < 0.1 < stack.weights[1] < stack.weights[0]


def test_equal_members_tie_and_the_first_is_kept():
    members, labels = _members(2.0)
    fit, _ = fit_blend(np.concatenate([members, members]), labels, FOLD_OF_ROW, get_metric("accuracy"), "hill")
    assert fit.weights == (1.0, 0.0)


def test_the_nested_check_never_fits_on_the_rows_it_scores(monkeypatch):
    """A fitter that memorises the labels of the rows it is fitted on scores perfectly in-sample,
    and, honestly nested, no better than a constant guess (class 0) on every held-out fold."""
    members, labels = _members(0.0)

    def memorise(members, labels, metric):
        seen = {row.tobytes(): label for row, label in zip(members[0], labels)}

        def predict(probs):
            out = np.zeros(probs.shape[1:])
            out[:, 0] = 0.5  # an unseen row: class 0
            for i, row in enumerate(probs[0]):
                if row.tobytes() in seen:
                    out[i, seen[row.tobytes()]] = 1.0
            return out

        return np.ones(len(members)), predict

    monkeypatch.setitem(blend.FITTERS, "hill", memorise)
    fit, _ = fit_blend(members, labels, FOLD_OF_ROW, get_metric("accuracy"), "hill")
    assert fit.score == 1.0 and fit.nested_score == pytest.approx(np.mean(labels == 0))


# End to end: two tiny runs of the same folds, blended by the command.


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_comp):
    """Two finished 2-fold runs (other models, same folds) and a third of other folds: (work folder, data)."""
    work = tmp_path_factory.mktemp("blend")
    data = work / "data"
    shutil.copytree(small_comp, data)
    (work / "tiny.toml").write_text(to_toml(TrainConfig(**{**TINY, "epochs": 1})))
    for name, settings in (("A", []), ("B", ["--set", "embed_dim=16"]), ("other", ["--set", "seed=1"])):
        result = runner.invoke(app, ["cv", "--config", str(work / "tiny.toml"), "--data-dir", str(data), "--quiet",
                                     "--run-dir", str(work / name), *settings])
        assert result.exit_code == 0, result.output
    return work, data


@pytest.mark.parametrize("method", ["hill", "stack"])
def test_submit_fit_blends_two_runs_and_prints_the_scores(two_runs, tmp_path, monkeypatch, method):
    work, data = two_runs
    out = tmp_path / "sub.csv"
    result = invoke(["submit", work / "A", work / "B", "--weighting", "fit", "--blend", method, "--data-dir", data,
                     "-o", out], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    spec = load_spec("digit-recognizer")
    competition = load_competition(spec, data)
    assert read_submission(out, spec, [str(i) for i in range(1, 201)]).shape == (200, 10)
    fit = make_submission([work / "A", work / "B"], competition, tmp_path / "again.csv", weighting="fit",
                          blend=method).blend
    assert fit.method == method and fit.rows == 600 and sum(fit.weights) == pytest.approx(1)
    shown = lambda v: f"{100 * v:.3f}%"  # noqa: E731
    assert (f"blend ({method}) fitted on 600 OOF rows: OOF accuracy {shown(fit.score)}, nested check "
            f"{shown(fit.nested_score)}") in result.output
    weight = "weight" if method == "hill" else "share of the coefficients"
    for run, score, w in zip(("A", "B"), fit.member_scores, fit.weights):
        assert f"{work / run}: OOF accuracy {shown(score)}, {weight} {w:.3f}" in result.output


def test_submit_fit_refuses_runs_of_other_folds_in_one_line(two_runs, tmp_path, monkeypatch):
    work, data = two_runs
    missing = tmp_path / "missing"
    shutil.copytree(work / "B", missing)
    (missing / "fold2" / "result.json").unlink()
    cases = [
        ([work / "A", work / "other"], [], f"error: {work / 'other'}: folds [1, 2] validated other rows than "
                                           f"{work / 'A'}'s; --weighting fit blends runs of the same folds "
                                           f"(same --folds and seed)"),
        ([work / "A", missing], ["--allow-missing"], f"error: {missing}: folds [1], but {work / 'A'}: folds [1, 2]; "
                                                     f"--weighting fit blends runs on the same folds' OOF rows"),
        ([work / "A", work / "B"], ["--fold", "2"], "error: --weighting fit: folds [2]; its nested check needs at "
                                                    "least 2"),
    ]
    for runs, extra, message in cases:
        result = invoke(["submit", *runs, "--weighting", "fit", "--data-dir", data, "-o", tmp_path / "sub.csv",
                         *extra], tmp_path, monkeypatch)
        assert result.exit_code == 2 and one_line(result) == message
        assert not (tmp_path / "sub.csv").exists()
    stack = invoke(["submit", work / "A", "--blend", "stack", "--data-dir", data, "-o", tmp_path / "sub.csv"],
                   tmp_path, monkeypatch)
    assert stack.exit_code == 2 and one_line(stack) == "error: --blend stack chooses how --weighting fit fits; add " \
                                                       "--weighting fit"
