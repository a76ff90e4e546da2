"""Data-parallel training of one fold (`cv --nproc N`, torchrun, DistributedDataParallel) on the CPU
with gloo: two ranks train what one process trains, only rank 0 writes, and a rank killed
mid-epoch costs at most that epoch (docs/distributed.md)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, invoke, one_line

from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.run.rundir import RunDir

# No batch norm (stem_channels 0: gloo has no SyncBatchNorm, so a conv stem's statistics would be
# each rank's own); batches of 16 that two ranks share as two groups of 8 augmented images; skip_easy
# so the ranks must agree on the rows each epoch leaves out.
EQUAL = {**TINY, "stem_channels": 0, "epochs": 3, "batch_size": 16, "aug_group": 8, "skip_easy": 0.5, "tta": 2}

# Installed in every rank other than 0 (sitecustomize): each file opened for writing, made, moved or
# removed under the run folder is listed in WRITES_LOG when the process ends.
AUDIT = textwrap.dedent("""
    import atexit, os, sys
    if os.environ.get("RANK", "0") != "0" and os.environ.get("AUDIT_RUN"):
        run, seen = os.path.realpath(os.environ["AUDIT_RUN"]), []
        WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        def hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = any(c in (mode or "") for c in "wax+") or (mode is None and flags & WRITE)
            elif event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
                path, writes = args[0], True
            else:
                return
            if writes and isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.realpath(os.fsdecode(path))
                if full.startswith(run):
                    seen.append(f"{event} {full}")
        sys.addaudithook(hook)
        atexit.register(lambda: open(os.environ["WRITES_LOG"], "a").write("".join(s + "\\n" for s in seen)))
""")


def _cv(cfg: Path, data: Path, run: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "kaggle_vit", "cv", "--config", str(cfg), "--data-dir", str(data), "--run-dir", str(run),
            "--quiet", *more]


def _env(tmp_path: Path, run: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "AUDIT_RUN": str(run),
            "WRITES_LOG": str(tmp_path / "writes.log")}


@pytest.mark.parametrize("on_device", ["off", "on"])  # batches built by the DataLoader, or where the images are
def test_two_ranks_train_a_fold_as_one_process_does_and_only_rank_0_writes(comp, tmp_path, on_device):
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**EQUAL, data_on_device=on_device)))
    alone, ranks = tmp_path / "alone", tmp_path / "ranks"
    one = subprocess.run(_cv(cfg, comp, alone, "--fold", "1"), capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_cv(cfg, comp, ranks, "--fold", "1", "--nproc", "2"), capture_output=True, text=True,
                         env=_env(tmp_path, ranks), timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (RunDir(r).fold(1).read_history() for r in (alone, ranks))
    assert len(a) == len(b) == EQUAL["epochs"]
    for x, y in zip(a, b):
        assert x.images == y.images  # together the ranks saw the rows one process saw
        assert abs(x.train_loss - y.train_loss) < 1e-4, (x, y)
        assert abs(x.valid_loss - y.valid_loss) < 1e-4, (x, y)
    probs = [RunDir(r).read_oof([1]) for r in (alone, ranks)]
    assert np.array_equal(probs[0][0], probs[1][0])  # the same validation rows
    assert np.array_equal(probs[0][2].argmax(1), probs[1][2].argmax(1))  # plain validation predictions
    assert np.array_equal(probs[0][3].argmax(1), probs[1][3].argmax(1))  # with the test-time views
    tests = [RunDir(r).fold(1).read_test_probs() for r in (alone, ranks)]
    assert np.array_equal(tests[0].argmax(1), tests[1].argmax(1))
    assert two.stdout.count("cross-validation") == 1  # rank 0 alone reports
    writes = (tmp_path / "writes.log").read_text() if (tmp_path / "writes.log").exists() else ""
    assert writes == "", writes  # rank 1 wrote nothing under the run folder


def test_audit_sees_a_rank_that_writes(tmp_path):
    """The audit the test above relies on catches a write by a rank other than 0."""
    run = tmp_path / "run"
    run.mkdir()
    env = {**_env(tmp_path, run), "RANK": "1"}
    done = subprocess.run([sys.executable, "-c", f"open({str(run / 'x')!r}, 'w').write('1')"], env=env, timeout=60)
    assert done.returncode == 0
    assert str(run / "x") in (tmp_path / "writes.log").read_text()


def _rank_pid(parent: int, rank: str) -> int | None:
    """The pid of torchrun's rank `rank` among `parent`'s children (its environment names the rank)."""
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == parent and f"RANK={rank}".encode() in environ:
            return int(child.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_then_the_same_command_resumes_and_finishes(comp, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**{**EQUAL, "epochs": 8, "batch_size": 8})))
    run = tmp_path / "run"
    command = _cv(cfg, comp, run, "--fold", "1", "--nproc", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = RunDir(run).fold(1).state
    deadline = time.monotonic() + 240
    while not state.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert state.exists(), first.communicate()
    victim = _rank_pid(first.pid, "1")
    assert victim is not None
    os.kill(victim, signal.SIGKILL)  # mid-epoch: an epoch takes longer than finding the rank
    out, err = first.communicate(timeout=120)
    assert first.returncode != 0, out + err
    assert not RunDir(run).fold(1).result.exists()
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "fold 1: resuming after epoch" in second.stderr, second.stderr
    assert [r.epoch for r in RunDir(run).fold(1).read_history()] == list(range(1, 9))
    assert RunDir(run).fold(1).result.exists()


@pytest.mark.parametrize("args, line", [
    (["--time-budget", "1m"], "error: --time-budget with --nproc or torchrun: the budget is measured in one process; "
                              "give --epochs instead"),
    (["--seeds", "2"], "error: --seeds with --nproc or torchrun: start one per seed (--set seed=N)"),
    (["--set", "batch_size=1"], "error: batch_size 1 is smaller than the 2 processes sharing each batch; give a "
                                "larger batch_size"),
])
def test_what_data_parallel_does_not_do_is_refused_in_one_line_before_it_starts(comp, tmp_path, monkeypatch, args, line):
    cfg = tmp_path / "c.toml"
    # TINY without its epochs (a time budget plans them)
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items() if k != "epochs"))
    result = invoke(["cv", "--config", cfg, "--data-dir", comp, "--nproc", "2", *args], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_one_line_and_keeps_the_last_epoch(comp, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**{**EQUAL, "epochs": 400, "batch_size": 8})))
    run = tmp_path / "run"
    proc = subprocess.Popen(_cv(cfg, comp, run, "--fold", "1", "--nproc", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = RunDir(run).fold(1).state
    deadline = time.monotonic() + 240
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert state.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"interrupted during fold 1, epoch \d+ of 400; the same command resumes",
                                            lines[0]), err
    assert state.exists() and not RunDir(run).fold(1).result.exists()
