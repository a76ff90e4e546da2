import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.records import EpochRecord
from kaggle_vit.spec import load_spec
from kaggle_vit.tune import default_space, heads_for

runner = CliRunner()
BASE = dict(model="kvit_pico_patch7_28", embed_dim=32, depth=1, num_heads=2, epochs=3, batch_size=64, folds=2,
            device="cpu", num_workers=0, valid_every=0)  # as the cpu preset: cv validates the last epoch only
SPACE = """
[patch_size]
choices = [7, 14]
[depth]
low = 1
high = 2
[drop_rate]
low = 0.0
high = 0.3
[lr]
low = 1e-4
high = 5e-3
log = true
[embed_dim]
choices = [32, 48]
"""


@pytest.fixture
def setup(tmp_path, small_comp):
    (tmp_path / "base.toml").write_text(to_toml(TrainConfig(**BASE)))
    (tmp_path / "space.toml").write_text(SPACE)
    data = tmp_path / "data" / "digit-recognizer"
    shutil.copytree(small_comp, data)
    return tmp_path


def _tune_args(root: Path, *extra: str) -> list[str]:
    return ["tune", "--config", str(root / "base.toml"), "--space", str(root / "space.toml"), *extra]


def test_tune_prunes_writes_best_and_resumes(setup, monkeypatch):
    monkeypatch.chdir(setup)
    first = runner.invoke(app, _tune_args(setup, "--trials", "6", "--epochs", "2"))
    assert first.exit_code == 0, first.output
    out = setup / "runs" / "digit-recognizer" / "tune-kvit-digit-recognizer"
    study = optuna.load_study(study_name="kvit-digit-recognizer", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and states.count(optuna.trial.TrialState.PRUNED) >= 1
    assert (out / "best.toml").exists() and (out / "optimization_history.png").exists()
    assert "best config" in first.output
    cv = runner.invoke(app, ["cv", "--config", str(out / "best.toml"), "--folds", "2", "--epochs", "1", "--quiet"])
    assert cv.exit_code == 0, cv.output
    assert "OOF accuracy" in cv.output
    again = runner.invoke(app, _tune_args(setup, "--trials", "2", "--epochs", "2"))
    assert again.exit_code == 0, again.output
    study = optuna.load_study(study_name="kvit-digit-recognizer", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 8
    trial0 = out / "trials" / "trial0" / "fold1"
    assert (trial0 / "valid_probs.npz").exists() and not (trial0 / "test_probs.npy").exists()  # no test set in a trial
    assert json.loads((trial0 / "result.json").read_text())["tta"] == 1  # and no test-time views
    history = pd.read_csv(trial0 / "history.csv")
    assert len(history) == 2 and history["valid_acc"].notna().all()  # trials validate every epoch for the pruner
    assert "valid_every = 0" in (out / "best.toml").read_text()  # while cv, from best.toml, keeps the base's


def _epoch(epoch: int, score: float) -> EpochRecord:
    """An epoch's record with the validation score `score` (NaN: not validated)."""
    return EpochRecord(epoch=epoch, train_loss=0.5, train_acc=0.8, valid_loss=0.5 if score == score else math.nan,
                       valid_acc=score, valid_score=score, lr=1e-3, seconds=1.0, images=64, images_per_s=64.0)


class _Trial:
    """What FoldMeanReporter sees of an Optuna trial: report and should_prune."""

    def __init__(self):
        self.reports = []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return False


@pytest.mark.parametrize("metric,scores,expected", [
    # two folds of three epochs: fold 1 ends at its best 0.8; fold 2's running mean includes it
    ("accuracy", [0.5, 0.8, 0.7, 0.6, 0.9, 0.85], [0.5, 0.8, 0.8, 0.7, 0.85, 0.85]),
    ("logloss", [0.9, 0.4, 0.6, 0.8, 0.2, 0.3], [0.9, 0.4, 0.4, 0.6, 0.3, 0.3]),  # lower is better
])
def test_reports_a_running_fold_mean_at_growing_steps(metric, scores, expected):
    from kaggle_vit.metrics import get_metric
    from kaggle_vit.tune import FoldMeanReporter

    trial = _Trial()
    reporter = FoldMeanReporter(trial, get_metric(metric))
    for i, score in enumerate(scores):
        reporter(_epoch(i % 3 + 1, score))
    assert [s for s, _ in trial.reports] == list(range(6))
    assert [v for _, v in trial.reports] == pytest.approx(expected)


def test_unvalidated_epochs_report_nothing_and_folds_still_count_apart():
    """With `valid_every`, an epoch without validation (NaN) reports nothing; a new fold is still
    recognised when its epochs start again, even when its first epoch is not validated."""
    from kaggle_vit.metrics import get_metric
    from kaggle_vit.tune import FoldMeanReporter

    trial = _Trial()
    reporter = FoldMeanReporter(trial, get_metric("accuracy"))
    for epoch, score in [(1, math.nan), (2, 0.6), (3, 0.8), (1, math.nan), (2, 0.7), (3, 0.9)]:
        reporter(_epoch(epoch, score))
    assert trial.reports == [(0, 0.6), (1, 0.8), (2, pytest.approx(0.75)), (3, pytest.approx(0.85))]


def test_heads_fit_width():
    assert [heads_for(w) for w in (32, 48, 64, 96, 192)] == [2, 3, 4, 6, 8]


VIT_SPACE = {"patch_size": {"choices": [4, 7]}, "depth": {"low": 2, "high": 6}, "drop_rate": {"low": 0.0, "high": 0.3},
             "lr": {"low": 5e-4, "high": 5e-3, "log": True}, "embed_dim": {"choices": [32, 48, 64, 96]}}
CNN_SPACE = {k: VIT_SPACE[k] for k in ("drop_rate", "lr")}


@pytest.mark.parametrize("model,space", [("kvit_pico_patch7_28", VIT_SPACE), ("vit_tiny_patch16_224", VIT_SPACE),
                                         ("resnet18", CNN_SPACE), ("efficientnet_b0", CNN_SPACE),
                                         ("convnext_atto", CNN_SPACE)])  # its patch_size is a stem's stride
def test_the_default_space_holds_only_what_the_model_takes(model, space):
    assert default_space(load_spec("digit-recognizer"), model) == space


def _cnn_base(root: Path) -> None:
    """BASE without the ViT's shape: the base of a CNN's study, one epoch per trial."""
    cfg = TrainConfig(**{**BASE, "embed_dim": None, "depth": None, "num_heads": None, "epochs": 1})
    (root / "base.toml").write_text(to_toml(cfg))


def test_a_cnn_tunes_its_default_space(setup, monkeypatch):
    _cnn_base(setup)
    monkeypatch.chdir(setup)
    result = runner.invoke(app, ["tune", "--config", "base.toml", "--set", "model=resnet18", "--trials", "1"])
    assert result.exit_code == 0, result.output
    out = setup / "runs" / "digit-recognizer" / "tune-resnet18-digit-recognizer"
    trial, = optuna.load_study(study_name="resnet18-digit-recognizer", storage=f"sqlite:///{out / 'study.db'}").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and set(trial.params) == {"drop_rate", "lr"}
    assert 'model = "resnet18"' in (out / "best.toml").read_text()


def test_a_space_key_the_model_cannot_take_is_refused_before_any_trial(setup, monkeypatch):
    _cnn_base(setup)
    monkeypatch.chdir(setup)
    result = runner.invoke(app, [*_tune_args(setup, "--trials", "1"), "--set", "model=resnet18"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {setup / 'space.toml'}: patch_size does not apply to resnet18 "
                                     f"(its constructor takes no such keyword)")
    assert not (setup / "runs").exists()


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on loopback (Debian's package; .ci/run installs it)."""
    if os.environ.get("KVIT_TEST_POSTGRES_URL"):
        yield os.environ["KVIT_TEST_POSTGRES_URL"]
        return
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    bindir, pgdata = bins[-1].parent, Path(tempfile.mkdtemp(prefix="kvit-pg-"))
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(pgdata, "postgres")
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(pgdata / "db"), "-A", "trust", "-U", "kvit"],
                   check=True, capture_output=True)
    port = 15432 + os.getpid() % 1000
    pg_ctl = [*as_pg, str(bindir / "pg_ctl"), "-D", str(pgdata / "db"), "-w"]
    subprocess.run([*pg_ctl, "-l", str(pgdata / "log"), "-o",
                    f"-p {port} -k {pgdata} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "kvit", "optuna"], check=True)
        yield f"postgresql://kvit@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(pgdata, ignore_errors=True)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_share_a_postgres_study_and_survive_a_kill(setup, postgres_url):
    url = postgres_url
    cmd = [sys.executable, "-m", "kaggle_vit.cli", *_tune_args(setup, "--storage", url, "--study-name", "shared",
                                                               "--epochs", "3", "--pruner", "none")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    a = subprocess.Popen([*cmd, "--trials", "3"], cwd=setup, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    b = subprocess.Popen([*cmd, "--trials", "3"], cwd=setup, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert a.wait(timeout=600) == 0, a.stdout.read().decode()
    assert b.wait(timeout=600) == 0, b.stdout.read().decode()
    study = optuna.load_study(study_name="shared", storage=url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 6 and sorted(numbers) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # Two workers again; one is killed mid-trial: the other finishes, and the study stays usable.
    victim = subprocess.Popen([*cmd, "--trials", "50"], cwd=setup, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    other = subprocess.Popen([*cmd, "--trials", "3"], cwd=setup, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, running = time.monotonic() + 120, []
    while not running and time.monotonic() < deadline:
        time.sleep(0.2)
        mine = [t for t in optuna.load_study(study_name="shared", storage=url).trials
                if t.state == optuna.trial.TrialState.RUNNING and t.number >= 6]
        running = mine if len(mine) >= 2 else []
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert running, "the workers never ran trials at once"
    assert other.wait(timeout=600) == 0, other.stdout.read().decode()
    time.sleep(11)  # past the heartbeat's grace period
    later = subprocess.run([*cmd, "--trials", "1"], cwd=setup, env=env, capture_output=True, text=True, timeout=600)
    assert later.returncode == 0, later.stdout + later.stderr
    study = optuna.load_study(study_name="shared", storage=url)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and optuna.trial.TrialState.RUNNING not in states
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 6 + 3 + 1
