"""The fault suite: each way a user's input, a damaged file or an interrupt used to end in a
traceback or a lost file. Every case asserts the exit status, the one line printed, and that no
file outside the run folder changed (checksums before and after)."""
from __future__ import annotations

import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FILES, TINY, invoke, one_line, snapshot

from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.data.tables import cache_path, load_image_csv
from kaggle_vit.io import is_running

# 1. `data` never writes over a user's files; it reads what Kaggle ships.

@pytest.mark.parametrize("command", [["data", "digit-recognizer", "--dest", "D"], ["cv", "--data-dir", "D", "--fold", "1"],
                                     ["submit", "--data-dir", "D"]])
@pytest.mark.parametrize("absent", ["train.csv", "sample_submission.csv"])
def test_a_partial_folder_is_refused_never_filled_in(comp, tmp_path, monkeypatch, command, absent):
    (comp / absent).unlink()
    before = snapshot(tmp_path)
    result = invoke([str(comp) if a == "D" else a for a in command], tmp_path, monkeypatch)
    assert result.exit_code == 2
    line = one_line(result)
    assert f"{absent} is missing" in line and "kaggle competitions download -c digit-recognizer" in line
    assert "--offline --dest NEW_DIR" in line
    assert snapshot(tmp_path) == before
    assert len(pd.read_csv(comp / "test.csv")) == 200  # the user's 200-row test file is still 200 rows


def _pack(comp: Path, layout: str) -> None:
    """Leave train.csv only in the compressed form Kaggle ships."""
    raw = (comp / "train.csv").read_bytes()
    if layout == "train.csv.gz":
        (comp / layout).write_bytes(gzip.compress(raw))
    elif layout == "train.csv.zip":
        with zipfile.ZipFile(comp / layout, "w") as zf:
            zf.writestr("train.csv", raw)
    else:  # Kaggle's own download: every file inside SLUG.zip
        with zipfile.ZipFile(comp / layout, "w") as zf:
            for name in FILES:
                zf.write(comp / name, name)
        for name in FILES[1:]:
            (comp / name).unlink()
    (comp / "train.csv").unlink()


@pytest.mark.parametrize("layout", ["train.csv.gz", "train.csv.zip", "digit-recognizer.zip"])
def test_kaggle_archives_are_unpacked_and_nothing_is_overwritten(comp, small_comp, tmp_path, monkeypatch, layout):
    _pack(comp, layout)
    before = snapshot(comp)
    result = invoke(["data", "digit-recognizer", "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "unpacked from the archives Kaggle ships" in result.output
    for name in FILES:
        assert (comp / name).read_bytes() == (small_comp / name).read_bytes()
    assert all(snapshot(comp).get(path) == digest for path, digest in before.items())  # every file kept as it was
    assert len(pd.read_csv(comp / "test.csv")) == 200


def test_an_offline_build_never_writes_over_a_solution_file(tmp_path, monkeypatch):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "solution.csv").write_text("ImageId,Label\n1,3\n")
    before = snapshot(tmp_path)
    result = invoke(["data", "digit-recognizer", "--offline", "--dest", dest], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert "solution.csv: already exists, and kaggle-vit never writes over your files" in one_line(result)
    assert snapshot(tmp_path) == before


# 2. Damaged files: a cache is rebuilt, a fold restarts or trains again, submit names the file.

def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[:100])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # one flipped byte in the header that says what the array is (raw pixels carry no checksum)
        middle = raw.index(b"shape")
        path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1 :])


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(comp, small_spec, tmp_path, monkeypatch, how):
    first = load_image_csv(comp / "train.csv", small_spec, train=True)
    images, labels = np.array(first.images), np.array(first.labels)  # copies: the damage is made in place
    del first
    cached = cache_path(comp / "train.csv", small_spec, train=True)
    _damage(cached, how)
    before = snapshot(comp, skip=None)
    result = invoke(["data", "digit-recognizer", "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"{cached}: unreadable cache" in notes[0] and "rebuilding it" in notes[0]
    again = load_image_csv(comp / "train.csv", small_spec, train=True)
    assert np.array_equal(again.images, images) and np.array_equal(again.labels, labels)
    changed = {p for p, d in snapshot(comp).items() if before.get(p) != d}
    assert str(cached) in changed and all(Path(p).parent == comp / ".kvcache" for p in changed)


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_unreadable_state_restarts_its_fold(comp, tiny, finished, tmp_path, monkeypatch, jobs):
    from kaggle_vit.run.cv import run_cv
    from kaggle_vit.spec import load_spec

    class Stop(Exception):
        pass

    def stop_after_first_epoch(record):
        raise Stop

    run = tmp_path / "run"
    data = load_competition(load_spec("digit-recognizer"), comp)
    with pytest.raises(Stop):
        run_cv(TrainConfig(**TINY), data, run, only_folds=[1], on_epoch=stop_after_first_epoch)
    state = run / "fold1" / "state.pt"
    _damage(state, "truncated")
    before = snapshot(comp)
    # one fold in this process, or both folds in worker processes (the note comes from a worker)
    folds = ["--fold", "1"] if jobs == 1 else ["--jobs", "2"]
    result = invoke(["cv", "--config", tiny, "--data-dir", comp, "--run-dir", run, "--quiet", *folds], tmp_path,
                    monkeypatch)
    assert result.exit_code == 0, result.output
    assert f"note: fold 1: {state} is unreadable (" in result.output
    assert "restarting the fold from its first epoch" in result.output and "Traceback" not in result.output
    if jobs == 1:  # the same thread count as the reference run: the same numbers, as if never interrupted
        reference = np.load(finished[0] / "fold1" / "test_probs.npy")
        assert np.array_equal(np.load(run / "fold1" / "test_probs.npy"), reference)
    assert snapshot(comp) == before


@pytest.mark.parametrize("how", ["missing", "truncated", "flipped"])
def test_a_damaged_checkpoint_is_named_by_submit_and_retrained_by_cv(run_copy, tiny, tmp_path, monkeypatch, how):
    run, data = run_copy
    model = run / "fold2" / "model.safetensors"
    reference = np.load(run / "fold2" / "test_probs.npy")
    model.unlink() if how == "missing" else _damage(model, how)  # a flipped byte: the tensor bytes' digest differs
    before = snapshot(data, tmp_path / "tiny.toml")
    result = invoke(["submit", run, "--data-dir", data, "--output", tmp_path / "sub.csv"], tmp_path, monkeypatch)
    assert result.exit_code == 2
    state = "missing" if how == "missing" else "unreadable"
    assert one_line(result) == (f"error: fold 2's checkpoint {model} is {state}: rerun `kaggle-vit cv` with the same "
                                f"settings to retrain it")
    assert not (tmp_path / "sub.csv").exists() and snapshot(data, tmp_path / "tiny.toml") == before
    result = invoke(["cv", "--config", tiny, "--data-dir", data, "--run-dir", run, "--quiet"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert f"note: fold 2: {model} is {state}; training the fold again" in result.output
    assert np.array_equal(np.load(run / "fold2" / "test_probs.npy"), reference)
    assert invoke(["submit", run, "--data-dir", data, "--output", tmp_path / "sub.csv"], tmp_path,
                  monkeypatch).exit_code == 0


# 3. Input that used to raise a traceback: one line, exit 2.

def _latin1_header(comp: Path) -> None:
    raw = (comp / "train.csv").read_bytes()
    (comp / "train.csv").write_bytes(raw.replace(b"pixel5,", "pixél5,".encode("latin-1"), 1))


def _gzip_named_csv(comp: Path) -> None:
    (comp / "train.csv").write_bytes(gzip.compress((comp / "train.csv").read_bytes()))


def _extra_field_in_row_1(comp: Path) -> None:
    lines = (comp / "train.csv").read_text().splitlines()
    lines[1] += ",0"
    (comp / "train.csv").write_text("\n".join(lines) + "\n")


def _duplicated_header(comp: Path) -> None:
    lines = (comp / "train.csv").read_text().splitlines()
    lines[0] = lines[0].replace("pixel9,", "pixel8,", 1)
    (comp / "train.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage, message", [
    (_gzip_named_csv, "train.csv: gzip-compressed data, not CSV text; rename it to train.csv.gz"),
    (_latin1_header, "train.csv: row 0: byte 0xe9 at character 45 is not UTF-8 text; save the file as UTF-8"),
    (_extra_field_in_row_1, "train.csv: row 1: 786 fields, but the header has 785"),
    (_duplicated_header, "train.csv: row 0: column 'pixel8' appears twice (header fields 10 and 11)"),
])
def test_unreadable_csv_is_one_line(comp, tmp_path, monkeypatch, damage, message):
    damage(comp)
    before = snapshot(tmp_path)
    result = invoke(["data", "digit-recognizer", "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2 and message in one_line(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("edit, message", [
    (("height = 28", "height = 0"), "[image]: height = 0 must be at least 1"),
    (("num_classes = 10", "num_classes = 0"), "[classes]: num_classes = 0 must be at least 2"),
    (("width = 28", "width = \"28\""), "[image]: width = '28' must be an integer"),
    (('metric = "accuracy"', 'metric = "rmse"'), "metric = 'rmse' is not known"),
    (('metric = "accuracy"', 'metric = "auc"'), "metric = 'auc' scores two classes, but num_classes = 10"),
])
def test_spec_values_are_checked_when_loaded(comp, tmp_path, monkeypatch, edit, message):
    from kaggle_vit.spec import bundled_dir

    spec = tmp_path / "spec.toml"
    spec.write_text((bundled_dir() / "digit-recognizer.toml").read_text().replace(*edit))
    before = snapshot(tmp_path)
    result = invoke(["data", "--competition", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2 and message in one_line(result)
    assert snapshot(tmp_path) == before


@pytest.fixture
def immutable(tmp_path):
    """Make a folder unwritable, even for root (chattr +i), and undo it afterwards."""
    made = []

    def freeze(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: no way to make a folder read-only")
        made.append(path)

    yield freeze
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o755)


def test_a_read_only_run_folder_is_one_line(run_copy, tiny, tmp_path, monkeypatch, immutable):
    run, data = run_copy
    immutable(run)
    before = snapshot(tmp_path)
    result = invoke(["cv", "--config", tiny, "--data-dir", data, "--run-dir", run], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result).startswith(f"error: {run}: cannot write to the run folder (")
    assert snapshot(tmp_path) == before


def test_score_against_a_solution_for_another_test_file(run_copy, tmp_path, monkeypatch):
    run, data = run_copy
    assert invoke(["submit", run, "--data-dir", data, "--output", tmp_path / "sub.csv"], tmp_path, monkeypatch).exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(data, other, ignore=shutil.ignore_patterns(".kvcache"))
    for name in ("test.csv", "sample_submission.csv"):
        pd.read_csv(other / name).head(150).to_csv(other / name, index=False)
    before = snapshot(tmp_path)
    result = invoke(["score", tmp_path / "sub.csv", "--solution", data / "solution.csv", "--data-dir", other,
                     "--run-dir", run], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {data / 'solution.csv'}: 200 rows, but {other / 'test.csv'} has 150; give the "
                                f"--data-dir whose test file this solution scores")
    assert {p: d for p, d in snapshot(tmp_path).items() if "kvcache" not in p} == \
        {p: d for p, d in before.items() if "kvcache" not in p}


# 4. Wrong or late messages: checked before anything is written or any worker starts.

@pytest.mark.parametrize("option, message", [
    (["--model", "vit_nonexistent"], "unknown model 'vit_nonexistent'"),
    (["--set", "patch_size=5"], "patch_size 5 does not divide 28x28"),
    (["--model", "vit_tiny_patch16_224", "--set", "patch_size=3"], "patch_size 3 does not divide 28x28"),
])
def test_an_impossible_model_fails_before_any_folder(comp, tiny, tmp_path, monkeypatch, option, message):
    before = snapshot(tmp_path)
    started = time.perf_counter()
    result = invoke(["cv", "--config", tiny, "--data-dir", comp, "--jobs", "2", *option], tmp_path, monkeypatch)
    assert result.exit_code == 2 and message in one_line(result)
    assert time.perf_counter() - started < 10 and not (tmp_path / "runs").exists()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option, message", [(["--trials", "0"], "--trials must be at least 1, got 0"),
                                             (["--timeout", "0"], "--timeout must be positive"),
                                             (["--pruner", "best"], "--pruner must be median, hyperband or none")])
def test_tune_that_could_run_nothing_creates_no_study(comp, tiny, tmp_path, monkeypatch, option, message):
    before = snapshot(tmp_path)
    result = invoke(["tune", "--config", tiny, "--data-dir", comp, *option], tmp_path, monkeypatch)
    assert result.exit_code == 2 and message in one_line(result)
    assert not (tmp_path / "runs").exists() and snapshot(tmp_path) == before


def test_a_diverging_fold_stops_instead_of_scoring(tmp_path, small_spec, mnist, tiny, monkeypatch):
    from conftest import build_small

    # 120 rows: one step per epoch, so the only non-finite loss is the validation loss after it
    data = build_small(tmp_path / "d", small_spec, mnist, 120, 20)
    before = snapshot(data)
    result = invoke(["cv", "--config", tiny, "--data-dir", data, "--set", "lr=1e30", "--epochs", "1", "--run-dir",
                     tmp_path / "run"], tmp_path, monkeypatch)
    assert result.exit_code == 2
    plan, error = result.output.strip().splitlines()  # the schedule, printed before the first step; then one line
    assert plan.startswith("60 training rows per fold: 1 epoch × 1 step of 64 = 1 step (lr 1e30")
    assert re.fullmatch(r"error: fold 1: epoch 1: the (validation )?loss became (nan|inf); lower lr, or set "
                        r"amp to bf16 or off", error)
    assert not (tmp_path / "run" / "oof.csv").exists()
    assert {p: d for p, d in snapshot(data).items() if "kvcache" not in p} == before


# 5. Interrupts (real processes, as a terminal sends them).

def _cv_command(cfg: Path, data: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "kaggle_vit.cli", "cv", "--config", str(cfg), "--data-dir", str(data),
            "--run-dir", str(run)]


def _wait_for(path_test, proc, limit: float = 240, log: Path | None = None) -> None:
    """Poll until `path_test()` holds; on failure, say whether the process had exited, how much disk
    was free (a full disk silently skips the disposable data cache) and what the process printed.
    The deadline is monotonic: a wall clock stepped forward (NTP on a fresh CI machine) must not end it."""
    started = time.monotonic()
    while not path_test() and proc.poll() is None and time.monotonic() - started < limit:
        time.sleep(0.02)
    if not path_test():
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        free = shutil.disk_usage(log.parent if log is not None else ".").free / 2**20
        pytest.fail(f"the run never got there: exit status {proc.poll()} after {time.monotonic() - started:.1f} s "
                    f"(limit {limit} s), {free:.0f} MiB free\n{tail}")


def _cv_in_its_second_epoch(comp: Path, tmp_path: Path, jobs: int, run: Path | None = None,
                            **popen) -> tuple[Path, Path, subprocess.Popen]:
    """A `cv` of 4 epochs in a subprocess (its config file, run folder and process), once fold 1
    has saved its first epoch's state: stopped or killed there, it has something to resume."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**{**TINY, "epochs": 4, "jobs": jobs})))
    run = run or tmp_path / "run"
    proc = subprocess.Popen(_cv_command(cfg, comp, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    _wait_for(lambda: (run / "fold1" / "state.pt").exists(), proc)
    return cfg, run, proc


def _message_lines(stderr: str) -> list[str]:
    """What a run printed on stderr besides its per-epoch `fold ...` lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("fold ")]


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_is_one_line_and_the_rerun_resumes_in_plain_lines(comp, tmp_path, jobs):
    # a path longer than 80 columns: a pipe must get it on one line
    long_run = tmp_path / ("a-run-folder-with-a-name-long-enough-to-wrap-at-eighty-columns-" * 2) / "run"
    before = snapshot(comp)
    # SIGINT as a terminal leaves it (a shell running this suite in the background ignores it)
    cfg, run, proc = _cv_in_its_second_epoch(comp, tmp_path, jobs, long_run, start_new_session=True,
                                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = _message_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert re.fullmatch(r"interrupted during fold 1, epoch [1-4] of 4( and fold 2(, epoch [1-4] of 4| \(starting\)))?; "
                        r"the same command resumes", lines[0]), lines[0]
    done = subprocess.run(_cv_command(cfg, comp, run), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^note: fold 1: resuming after epoch [1-4] of 4$", done.stderr, re.M), done.stderr
    assert any(line.endswith(f"run in {run}") for line in done.stdout.splitlines()), done.stdout
    epoch_lines = [line for line in done.stderr.splitlines() if line.startswith("fold") and " epoch " in line]
    assert epoch_lines and all(line.endswith("s") and "img/s" in line for line in epoch_lines)
    assert {p: d for p, d in snapshot(comp).items() if "kvcache" not in p} == \
        {p: d for p, d in before.items() if "kvcache" not in p}


def test_sigterm_stops_the_run_and_its_workers_as_ctrl_c_does(comp, tmp_path):
    _, run, proc = _cv_in_its_second_epoch(comp, tmp_path, jobs=2)
    proc.terminate()  # what `timeout` and `kill PID` send: the parent alone
    stdout, stderr = proc.communicate(timeout=60)  # returns once every worker has exited too (they hold stderr)
    assert proc.returncode == 130, stderr
    lines = _message_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("interrupted during fold 1, epoch "), stderr
    assert not list(run.rglob("*.tmp")) and not list(run.glob(".arrays-*")) and not (run / "fold1" / "result.json").exists()


def _pool_workers(parent: int) -> list[int]:
    """The pids of `parent`'s fold workers (the pool's spawned processes, not its resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_worker_killed_by_the_system_is_one_line_and_the_rerun_resumes(comp, tmp_path):
    # The kernel's OOM killer ends a worker with SIGKILL: the pool breaks; cv names the folds that
    # were training, stops the other worker, keeps what was written, and the same command goes on.
    cfg, run, proc = _cv_in_its_second_epoch(comp, tmp_path, jobs=2)
    workers = _pool_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    lines = _message_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr and "leaked" not in stderr, stderr
    assert re.fullmatch(r"error: a worker process stopped during fold 1( and fold 2)?.*; the same command resumes",
                        lines[0]), lines[0]
    assert not list(run.glob(".arrays-*")) and all(not is_running(pid) for pid in workers)
    done = subprocess.run(_cv_command(cfg, comp, run), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "note: fold 1: resuming after epoch" in done.stderr


def test_a_worker_stops_soon_after_its_parent_is_killed_whatever_it_is_doing():
    # The worker sleeps where a long prediction would run: it reports nothing the parent's death could be noticed by.
    worker = ("import os, sys, time; from kaggle_vit.run.jobs import watch_parent; watch_parent(os.getppid()); "
              "print('watching', flush=True); time.sleep(60)")
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "watching\n"
    proc.kill()  # SIGKILL: the parent cannot stop its worker
    started = time.monotonic()
    assert proc.stdout.read() == ""  # end of file: the worker, which held the pipe too, has exited
    assert time.monotonic() - started < 10
    proc.wait()


def test_sigkill_while_workers_start_prints_nothing(comp, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**{**TINY, "jobs": 2})))
    run = tmp_path / "run"
    proc = subprocess.Popen(_cv_command(cfg, comp, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(run.glob(".arrays-*/workers.log")), proc)  # the pool is starting
    proc.kill()  # the parent only, as `kill -9 PID` does; its workers are starting
    stdout, stderr = proc.communicate(timeout=120)  # returns once every worker has exited too
    assert "Traceback" not in stderr and "UnpicklingError" not in stderr and "leaked" not in stderr, stderr
    assert not (run / "fold1" / "result.json").exists()


# 6. Start-up: help and data need neither torch nor albumentations.

def test_help_and_data_import_no_torch(comp):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom kaggle_vit.cli import app\n"
            "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
            f"assert CliRunner().invoke(app, ['data', 'digit-recognizer', '--dest', {str(comp)!r}]).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'albumentations', 'timm', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_submit_from_saved_probabilities_imports_no_torch(run_copy, tmp_path):
    # submit checks each fold's checkpoint (intact, the competition's image size and class count)
    # from its archive without torch; only --tta, which recomputes, needs the model
    run, data = run_copy
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom kaggle_vit.cli import app\n"
            f"r = CliRunner().invoke(app, ['submit', {str(run)!r}, '--data-dir', {str(data)!r}, '-o', {str(tmp_path / 's.csv')!r}])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'albumentations', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    assert len(pd.read_csv(tmp_path / "s.csv")) == 200


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_albumentations_update_check_is_off_unless_the_user_set_it(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    if preset is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = preset
    code = "import os, kaggle_vit; print(os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == expected


def test_pinned_versions_match_what_the_code_checks():
    import tomllib

    from kaggle_vit.versions import BELOW, MINIMUM, version_problems

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"([\w-]+)(.*)", d).groups() for d in deps)
    for name, low in MINIMUM.items():
        assert pins[name].split(",")[0] == f">={low}", name
    for name, high in BELOW.items():
        assert f"<{high}" in pins[name]
    assert version_problems() == []  # this environment satisfies them


# The kill test: SIGKILL at several points, then the same command; results equal an uninterrupted run.

def _kill_points(data: Path, run: Path) -> dict:
    return {
        "data loading": lambda: any(data.glob(".kvcache/*")),
        "mid-epoch": lambda: (run / "fold1" / "state.pt").exists(),
        "between folds": lambda: (run / "fold1" / "result.json").exists(),
        "writing predictions": lambda: (run / "fold1" / "model.safetensors").exists(),
    }


@pytest.mark.slow
@pytest.mark.parametrize("point", ["data loading", "mid-epoch", "between folds", "writing predictions"])
def test_sigkill_at_any_point_then_rerun_equals_an_uninterrupted_run(tmp_path, small_spec, mnist, point):
    from conftest import build_small

    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(TrainConfig(**{**TINY, "tta": 9, "epochs": 3})))
    reference_data = build_small(tmp_path / "ref-data", small_spec, mnist, 600, 2000)
    subprocess.run(_cv_command(cfg, reference_data, tmp_path / "ref"), check=True, capture_output=True, timeout=600)
    data = tmp_path / "data"
    shutil.copytree(reference_data, data, ignore=shutil.ignore_patterns(".kvcache"))
    run = tmp_path / "run"
    log = tmp_path / "killed-run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(_cv_command(cfg, data, run), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _wait_for(_kill_points(data, run)[point], proc, log=log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if point == "writing predictions":
        assert not (run / "fold1" / "result.json").exists(), "killed too late to test this point"
    done = subprocess.run(_cv_command(cfg, data, run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ref_oof, oof = pd.read_csv(tmp_path / "ref" / "oof.csv"), pd.read_csv(run / "oof.csv")
    pd.testing.assert_frame_equal(oof, ref_oof)
    for k in (1, 2):
        np.testing.assert_array_equal(np.load(run / f"fold{k}" / "test_probs.npy"),
                                      np.load(tmp_path / "ref" / f"fold{k}" / "test_probs.npy"))
