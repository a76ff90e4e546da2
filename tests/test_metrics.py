"""Every metric against scikit-learn on known inputs, its direction, and the competition's metric
driving the best epoch, the OOF score and `kaggle-vit score`."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.metrics import EPS, METRICS, clip_probs, get_metric
from kaggle_vit.spec import bundled_dir, load_spec
from kaggle_vit.train.dataset import ImageDataset
from kaggle_vit.train.engine import fit

LABELS = np.array([0, 1, 2, 2, 1, 0, 2])
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.1, 0.4], [0.3, 0.3, 0.4],
                  [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_each_metric_is_scikit_learns_value():
    pred = PROBS.argmax(1)
    assert get_metric("accuracy")(LABELS, PROBS) == pytest.approx(accuracy_score(LABELS, pred)) == pytest.approx(5 / 7)
    assert get_metric("f1_micro")(LABELS, PROBS) == pytest.approx(f1_score(LABELS, pred, average="micro"))
    assert get_metric("f1_macro")(LABELS, PROBS) == pytest.approx(f1_score(LABELS, pred, average="macro"))
    clipped = np.clip(PROBS, EPS, 1 - EPS)
    clipped /= clipped.sum(1, keepdims=True)
    by_hand = -np.mean(np.log(clipped[np.arange(7), LABELS]))
    assert get_metric("logloss")(LABELS, PROBS) == pytest.approx(log_loss(LABELS, clipped)) == pytest.approx(by_hand)
    binary, p1 = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert get_metric("auc")(binary, np.stack([1 - p1, p1], 1)) == pytest.approx(roc_auc_score(binary, p1)) == 0.75


def test_directions_and_clipping():
    assert [m.direction for m in METRICS.values()] == ["maximize", "minimize", "maximize", "maximize", "maximize"]
    assert get_metric("logloss").better(0.1, 0.2) and get_metric("accuracy").better(0.9, 0.8)
    assert get_metric("accuracy").better(0.5, None) and not get_metric("auc").better(0.5, 0.6)
    clipped = clip_probs(np.array([[1.0, 0.0]]))
    assert clipped.min() > 0 and math.isfinite(get_metric("logloss")(np.array([1]), np.array([[1.0, 0.0]])))
    with pytest.raises(KaggleVitError, match="metric 'rmse' is not known"):
        get_metric("rmse")


def _spec(tmp_path, metric: str, extra: str = ""):
    text = (bundled_dir() / "digit-recognizer.toml").read_text().replace('metric = "accuracy"', f'metric = "{metric}"')
    path = tmp_path / f"digits-{metric}.toml"
    path.write_text(text + extra)
    return path


def test_a_binary_metric_needs_two_classes(tmp_path):
    with pytest.raises(KaggleVitError, match=r"metric = 'auc' scores two classes, but num_classes = 10$"):
        load_spec(_spec(tmp_path, "auc"))


def test_the_best_epoch_is_the_metrics_best(mnist):
    train, valid = ImageDataset(mnist[0][:600, None], mnist[1][:600]), ImageDataset(mnist[0][600:800, None], mnist[1][600:800])
    from kaggle_vit.models.factory import create_model

    cfg = TrainConfig(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, epochs=3, batch_size=32,
                      device="cpu", num_workers=0, lr=3e-2)  # a high rate: validation goes up and down
    result = fit(create_model(cfg, load_spec("digit-recognizer")), train, valid, cfg, seed=1, metric=get_metric("logloss"))
    losses = [r.valid_score for r in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert losses[result.best_epoch - 1] == pytest.approx(log_loss(valid.labels.numpy(), clip_probs(result.valid_probs),
                                                                   labels=np.arange(10)), rel=1e-5)


@pytest.mark.parametrize("metric", ["f1_macro", "logloss"])
def test_score_gives_the_competitions_metric(small_comp, tmp_path, monkeypatch, metric):
    spec_path = _spec(tmp_path, metric)
    solution = pd.read_csv(small_comp / "solution.csv")
    guess = solution.copy()
    guess.loc[::7, "Label"] = (guess.loc[::7, "Label"] + 1) % 10  # every 7th label wrong
    guess.to_csv(tmp_path / "guess.csv", index=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["score", "guess.csv", "--competition", str(spec_path), "--data-dir", str(small_comp)])
    assert result.exit_code == 0, result.output
    truth, pred = solution["Label"].to_numpy(), guess["Label"].to_numpy()
    if metric == "f1_macro":
        expected = f1_score(truth, pred, average="macro")
    else:
        expected = log_loss(truth, clip_probs(np.eye(10)[pred]), labels=np.arange(10))
    assert f"{metric} {expected:.5f} on" in result.output.splitlines()[0]
