"""A run folder shared by several `cv` processes, as a Slurm array or a loop over ssh starts them
(docs/distributed.md): each fold trained by one of them, the shared files written once and whole,
a fold claimed by a live process skipped and a stale claim taken over, each with one line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import TINY, invoke

from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.io import HOST
from kaggle_vit.records import FoldClaim
from kaggle_vit.run import claims
from kaggle_vit.run.claims import CLAIM_TIMEOUT_S, FoldClaims
from kaggle_vit.run.rundir import RunDir

ONE_FAST_FOLD = {**TINY, "epochs": 1, "tta": 1}


def _cv(cfg, data, run) -> list[str]:
    return [sys.executable, "-m", "kaggle_vit.cli", "cv", "--config", str(cfg), "--data-dir", str(data), "--folds", "3",
            "--run-dir", str(run), "--quiet"]


def test_three_processes_on_one_run_folder_train_each_fold_once(comp, tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**ONE_FAST_FOLD)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each, the same numbers in every process
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    done = subprocess.run(_cv(cfg, comp, alone), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    procs = [subprocess.Popen(_cv(cfg, comp, shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    trained = [re.findall(r"^fold (\d): valid acc", stderr, re.M) for _, stderr in outputs]
    skipped = [re.findall(r"^note: fold (\d): (?:being trained by \S+ since \d\d:\d\d|finished by another process); "
                          r"skipped$", stderr, re.M) for _, stderr in outputs]
    assert sorted(k for folds in trained for k in folds) == ["1", "2", "3"], outputs  # each fold by one process
    for folds, others, (_, stderr) in zip(trained, skipped, outputs):
        assert len(set(folds + others)) == len(folds + others), stderr  # a fold skipped says so once
        lines = [line for line in stderr.splitlines() if not line.startswith("fold ")]
        assert len(lines) == len(others), stderr  # nothing else: no stale claim, no fold trained again
    for name in ("folds.csv", "config.toml", "plan.json", "oof.csv"):
        assert (shared / name).read_bytes() == (alone / name).read_bytes(), name
    assert RunDir(shared).read_metrics().complete
    assert not list(shared.rglob("claim.json")) and not list(shared.rglob("*.tmp"))
    for run, output in ((alone, "alone.csv"), (shared, "shared.csv")):
        result = invoke(["submit", run, "--data-dir", comp, "--output", tmp_path / output], tmp_path, monkeypatch)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "shared.csv").read_bytes() == (tmp_path / "alone.csv").read_bytes()


def _plant(run: RunDir, host: str, pid: int, age: float) -> float:
    """Fold 1's claim by `host`:`pid`, made (and last refreshed) `age` seconds ago; returns when."""
    then = time.time() - age
    assert run.fold(1).create_claim(FoldClaim(host, pid, then, then))
    return then


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# whose claim (given a dead pid), its heartbeat's age, whether it is taken over, and the line said
CLAIMS = {
    "this machine, its process gone": (lambda dead: (HOST, dead), 0.0, True,
                                       "{who}, which claimed it at {at}, has stopped; taking the fold over"),
    "another machine, no heartbeat for long": (lambda dead: ("elsewhere", 4242), 2 * CLAIM_TIMEOUT_S, True,
                                               "{who} has sent no heartbeat since {at}; taking the fold over"),
    "this machine, its process alive": (lambda dead: (HOST, os.getppid()), 0.0, False,
                                        "being trained by {who} since {at}; skipped"),
    "another machine, a recent heartbeat": (lambda dead: ("elsewhere", 4242), 60.0, False,
                                            "being trained by {who} since {at}; skipped"),
}


@pytest.mark.parametrize("case", list(CLAIMS))
def test_a_live_claim_is_skipped_and_a_stale_one_taken_over_with_one_line(tmp_path, monkeypatch, dead_pid, case):
    owner, age, stale, line = CLAIMS[case]
    host, pid = owner(dead_pid)
    run = RunDir(tmp_path / "run")
    then = _plant(run, host, pid, age)
    notes = []
    monkeypatch.setattr(claims, "notice", notes.append)
    with FoldClaims(run) as held:
        assert held.take(1) == stale
        claim, _ = run.fold(1).read_claim()
        assert (claim.host, claim.pid) == ((HOST, os.getpid()) if stale else (host, pid))
    assert notes == ["fold 1: " + line.format(who=f"{host}:{pid}", at=time.strftime("%H:%M", time.localtime(then)))]
    assert run.fold(1).claim.exists() != stale  # this process's claim is given up; the other's is kept


def test_an_unreadable_claim_is_taken_over(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.fold(1).root.mkdir(parents=True)
    run.fold(1).claim.write_text("")  # a process killed while it wrote its claim
    notes = []
    monkeypatch.setattr(claims, "notice", notes.append)
    with FoldClaims(run) as held:
        assert held.take(1)
    assert notes == [f"fold 1: {run.fold(1).claim} is unreadable; taking the fold over"]


def test_a_held_claim_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    with FoldClaims(run) as held:
        assert held.take(1)
        first, _ = run.fold(1).read_claim()
        time.sleep(0.5)
        later, _ = run.fold(1).read_claim()
        assert later.heartbeat > first.heartbeat and later.started == first.started
    assert not run.fold(1).claim.exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_cv_skips_a_fold_another_process_trains(comp, tmp_path, monkeypatch, jobs):
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**{**ONE_FAST_FOLD, "jobs": jobs})))
    run = RunDir(tmp_path / "run")
    then = _plant(run, HOST, os.getppid(), 0.0)
    result = invoke(["cv", "--config", cfg, "--data-dir", comp, "--run-dir", run.root, "--quiet"], tmp_path,
                    monkeypatch)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    since = time.strftime("%H:%M", time.localtime(then))
    assert notes == [f"note: fold 1: being trained by {HOST}:{os.getppid()} since {since}; skipped"]
    assert "folds done: [2] of 2" in result.output
    assert run.fold(1).claim.exists() and not run.fold(1).result.exists() and run.fold(2).result.exists()
    again = invoke(["cv", "--config", cfg, "--data-dir", comp, "--run-dir", run.root, "--fold", "2", "--quiet"],
                   tmp_path, monkeypatch)  # a Slurm array task requeued after its fold finished
    assert again.exit_code == 0, again.output
    assert [line for line in again.output.splitlines() if line.startswith("note:")] == \
        ["note: fold 2: already finished; skipped"]
