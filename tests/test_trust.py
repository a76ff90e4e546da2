"""The trust suite (issue: trust nothing that is read, write nothing that was not asked for).

Each case is a bad, hostile or faulty input tried as a user or an attacker would. Each test asserts the
exit status, the one line printed (no traceback), and the checksums of every file outside the folders
the command may write, before and after. Crafted pickles carry a payload that would create a file;
the tests assert it never appears."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, build_small, invoke, one_line, png_bomb, snapshot
from PIL import Image
from test_faults import immutable  # noqa: F401 - a fixture: a folder even root cannot write
from test_layouts import NAMES, files_competition, files_spec, folders_competition, folders_spec

from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.data.fetch import write_competition_files
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.spec import bundled_dir, load_spec

# 1. Opening a file never runs code: run folders, pretrained weights, pseudo sources.

OLD = ("is in the old pickle format, which is never loaded (a pickle can run code): rerun `kaggle-vit cv` with the "
       "same settings to retrain it")


class Plant:
    """Unpickling this runs `touch MARKER`: what a crafted file would run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _old_checkpoint(run: Path, marker: Path) -> Path:
    """fold1 as an older kaggle-vit wrote it (model.pt, a pickle), crafted."""
    (run / "fold1" / "model.safetensors").unlink(missing_ok=True)
    path = run / "fold1" / "model.pt"
    torch.save({"model": Plant(marker), "kwargs": {}, "state_dict": {}, "input_size": (1, 28, 28), "num_classes": 10},
               path)
    return path


def _state(run: Path, marker: Path) -> Path:
    """fold1 unfinished, its training state crafted."""
    (run / "fold1" / "result.json").unlink()
    path = run / "fold1" / "state.pt"
    torch.save({"model": Plant(marker), "state": {}}, path)
    return path


def _test_probs(run: Path, marker: Path) -> Path:
    path = run / "fold1" / "test_probs.npy"
    np.save(path, np.array([Plant(marker)], dtype=object), allow_pickle=True)
    return path


def _valid_probs(run: Path, marker: Path) -> Path:
    path = run / "fold1" / "valid_probs.npz"
    with np.load(path) as z:
        rows = z["rows"]
    np.savez(path, rows=rows, probs=np.array([Plant(marker)], dtype=object), probs_plain=np.array([Plant(marker)]))
    return path


def _weights(suffix: str):
    def plant(run: Path, marker: Path) -> Path:
        path = run.parent / f"weights{suffix}"
        torch.save({"model": Plant(marker), "state_dict": {"w": torch.zeros(1)}}, path)
        return path
    return plant


SUBMIT = lambda run, data, tmp, tiny, planted: ["submit", run, "--data-dir", data, "--output", tmp / "sub.csv"]
RESUME = lambda run, data, tmp, tiny, planted: ["cv", "--config", tiny, "--data-dir", data, "--run-dir", run, "--quiet"]
NEW_CV = lambda run, data, tmp, tiny, planted: ["cv", "--config", tiny, "--data-dir", data, "--run-dir", tmp / "new",
                                                "--quiet"]

# (what is planted, the command, its exit status, the line it prints: an error's one line, or cv's notice)
CASES = {
    "model.pt-submit": (_old_checkpoint, SUBMIT, 2, lambda p, run: f"error: fold 1's checkpoint {p} {OLD}"),
    "model.pt-submit-tta": (_old_checkpoint, lambda *a: [*SUBMIT(*a), "--tta", "2"], 2,
                            lambda p, run: f"error: fold 1's checkpoint {p} {OLD}"),
    "model.pt-report": (_old_checkpoint, lambda run, data, *a: ["report", run, "--data-dir", data], 2,
                        lambda p, run: f"error: fold 1's checkpoint {p} {OLD}"),
    "model.pt-cv": (_old_checkpoint, RESUME, 0,
                    lambda p, run: f"note: fold 1: {p} {OLD.split(':')[0]}; training the fold again"),
    "state.pt-cv": (_state, RESUME, 0,
                    lambda p, run: f"note: fold 1: {p} is unreadable (UnpicklingError); restarting the fold from its "
                                   f"first epoch"),
    "valid_probs-cv": (_valid_probs, RESUME, 0, lambda p, run: f"note: fold 1: {p} is unreadable; training the fold again"),
    "test_probs-submit": (_test_probs, SUBMIT, 2,
                          lambda p, run: f"error: {p}: unreadable (ValueError); rerun `kaggle-vit cv` with the same "
                                         f"settings to rewrite it"),
    "test_probs-report": (_test_probs, lambda run, data, *a: ["report", run, "--data-dir", data], 2,
                          lambda p, run: f"error: {p}: unreadable (ValueError); rerun `kaggle-vit cv` with the same "
                                         f"settings to rewrite it"),
    "test_probs-pseudo": (_test_probs, lambda run, *a: [*NEW_CV(run, *a), "--set", f"pseudo={run}"], 2,
                          lambda p, run: f"error: pseudo {p}: unreadable (ValueError); rerun `kaggle-vit cv` for "
                                         f"{run} to rewrite it"),
    "pth-pretrained": (_weights(".pth"), lambda *a: [*NEW_CV(*a), "--set", f"pretrained={a[-1]}"], 2,
                       lambda p, run: f"error: pretrained {p}: not a readable weights file ("),
    "pt-pretrained": (_weights(".pt"), lambda *a: [*NEW_CV(*a), "--set", f"pretrained={a[-1]}"], 2,
                      lambda p, run: f"error: pretrained {p}: not a readable weights file ("),
}


def _outside(tmp_path: Path, run: Path | None = None) -> dict[str, str]:
    """Checksums of what a command may not write: everything but the run folder `run` (cv's), the
    shared folds file beside it and the image caches."""
    return {p: d for p, d in snapshot(tmp_path, skip=run).items()
            if "kvcache" not in p and not Path(p).name.startswith("folds-k")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_pickle_runs_nothing(run_copy, tiny, tmp_path, monkeypatch, case):
    plant, command, status, expected = CASES[case]
    run, data = run_copy
    marker = tmp_path / "ran-code"
    planted = plant(run, marker)
    before, run_before = _outside(tmp_path, run), snapshot(run)
    result = invoke(command(run, data, tmp_path, tiny, planted), tmp_path, monkeypatch)
    assert not marker.exists(), "the crafted pickle ran"
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    if status:  # refused: one line, and nothing written anywhere
        line, want = one_line(result), expected(planted, run)
        assert line == want or want.endswith("(") and line.startswith(want), line  # (: the error's type follows
        assert snapshot(run) == run_before and not (tmp_path / "sub.csv").exists() and not (tmp_path / "new").exists()
    else:  # cv: one notice, then the fold is trained again from scratch, and the crafted file is gone
        notes = [line for line in result.output.splitlines() if line.startswith("note:")]
        assert notes == [expected(planted, run)], result.output
        assert not planted.exists() or planted.read_bytes() != run_before[str(planted)]
        assert (run / "fold1" / "result.json").exists() and (run / "fold1" / "model.safetensors").exists()
    assert _outside(tmp_path, run) == before


def test_a_fold_checkpoint_round_trips_and_its_header_is_read_without_torch(run_copy, tmp_path):
    from kaggle_vit.models.factory import build
    from kaggle_vit.run.rundir import RunDir

    run, _ = run_copy
    path = run / "fold1" / "model.safetensors"
    code = ("import json, sys\nfrom pathlib import Path\nfrom kaggle_vit.models.checkpoint import checkpoint_header\n"
            f"h = checkpoint_header(Path({str(path)!r}))\n"
            "print(json.dumps([h.model, h.fold, h.kwargs['img_size'], h.input_size, "
            "sorted(m for m in ('torch', 'safetensors') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # JSON; then the keywords as the model takes them (a tuple); neither torch nor safetensors imported
    assert json.loads(out.stdout) == ["kvit_pico_patch7_28", 1, [28, 28], [1, 28, 28], []]
    header = RunDir(run).fold(1).read_checkpoint()
    assert header.kwargs["img_size"] == (28, 28) and header.input_size == (1, 28, 28)
    model = RunDir(run).fold(1).read_model()
    fresh = build(header.model, header.kwargs)  # other weights: the file's are what makes the prediction
    x = torch.randn(4, 1, 28, 28)
    assert not torch.equal(fresh.eval()(x), model(x))
    # what cv predicted with the weights in memory, the weights read back predict: fold 1's saved
    # test probabilities come back from the file (3 test-time views, as TINY)
    data = load_competition(load_spec("digit-recognizer"), run_copy[1])
    from kaggle_vit.submit import fold_test_probs

    np.testing.assert_allclose(fold_test_probs(run, 1, data, tta=3, device="cpu"),
                               np.load(run / "fold1" / "test_probs.npy"), atol=1e-6)


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_a_damaged_test_probs_is_named_by_submit_and_recomputed_only_with_tta(run_copy, tmp_path, monkeypatch, how):
    run, data = run_copy
    path = run / "fold2" / "test_probs.npy"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if how == "truncated" else bytes(len(raw)))
    before = _outside(tmp_path)  # submit writes nothing but its output
    result = invoke(["submit", run, "--data-dir", data, "--output", tmp_path / "sub.csv"], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {path}: unreadable (ValueError); rerun `kaggle-vit cv` with the same settings "
                                f"to rewrite it")
    assert not (tmp_path / "sub.csv").exists() and _outside(tmp_path) == before
    again = invoke(["submit", run, "--data-dir", data, "--output", tmp_path / "sub.csv", "--tta", "2"], tmp_path,
                   monkeypatch)
    assert again.exit_code == 0 and (tmp_path / "sub.csv").exists(), again.output


def _limit_file_size(size: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_full_disk_while_cv_saves_its_state_is_one_line_naming_the_file(run_copy, tiny, tmp_path):
    run, data = run_copy
    load_competition(load_spec("digit-recognizer"), data)  # the image caches, built before the limit
    new = tmp_path / "new"
    before = _outside(tmp_path, new)
    # a limit above every small file cv writes (config, folds), below the training state's size
    out = subprocess.run([sys.executable, "-m", "kaggle_vit.cli", "cv", "--config", str(tiny), "--data-dir", str(data),
                          "--run-dir", str(new), "--fold", "1", "--quiet"], capture_output=True, text=True,
                         timeout=300, preexec_fn=_limit_file_size(64 * 1024), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {new / 'fold1' / 'state.pt'}: File too large"], out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert not list(new.rglob("*.tmp")) and not (new / "fold1" / "state.pt").exists()  # no half file
    assert _outside(tmp_path, new) == before


# 2, 4, 6 and 7. Writes only where asked, bounded resources, data never changed silently, messages that point at the fix.

BUNDLED = Path(__file__).resolve().parent.parent / "competitions"


def _cli(args: list, cwd: Path, limit_bytes: int | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """The CLI in a fresh process (stderr as a user sees it), optionally with a file-size limit:
    a write past it fails with EFBIG as a full disk fails with ENOSPC (SIGXFSZ ignored, as a
    full disk sends no signal)."""
    limit = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n") if limit_bytes else ""
    code = f"import sys\n{limit}{prelude}from kaggle_vit.cli import main\nsys.argv = ['kaggle-vit', *{[str(a) for a in args]!r}]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def _only_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stdout + proc.stderr
    return lines[0]


# 1. `submit --output` writes a new regular file, or one the user said to replace.

@pytest.mark.parametrize("output", [None, "mine.csv"])
def test_submit_never_writes_over_an_existing_file_unless_forced(run_copy, tmp_path, monkeypatch, output):
    run, data = run_copy
    target = tmp_path / (output or "submission.csv")  # None: the default, submission.csv
    target.write_text("my own notes\n")
    args = ["submit", run, "--data-dir", data, *(["--output", output] if output else [])]
    before = snapshot(tmp_path)
    result = invoke(args, tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {output or 'submission.csv'}: already exists; pass --force to replace it, "
                                f"or choose another --output")
    assert snapshot(tmp_path) == before
    forced = invoke([*args, "--force"], tmp_path, monkeypatch)
    assert forced.exit_code == 0, forced.output
    assert len(pd.read_csv(target)) == 200


@pytest.mark.parametrize("name", ["train.csv", "test.csv", "sample_submission.csv", "solution.csv"])
def test_submit_never_writes_the_competitions_own_files_even_forced(run_copy, tmp_path, monkeypatch, name):
    run, data = run_copy
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        result = invoke(["submit", run, "--data-dir", data, "--output", data / name, *force], tmp_path, monkeypatch)
        assert result.exit_code == 2
        assert one_line(result) == (f"error: {data / name}: one of the competition's own files in {data}, never "
                                    f"written over; choose another --output")
        assert snapshot(tmp_path) == before


def test_submit_never_writes_into_the_image_folders(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    before = snapshot(tmp_path)
    # refused before any work: no run is needed to see it
    result = invoke(["submit", "-c", spec, "--data-dir", comp, "-o", comp / "train" / "0.png", "--force"], tmp_path,
                    monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {comp / 'train' / '0.png'}: one of the competition's own files in {comp}, "
                                f"never written over; choose another --output")
    assert snapshot(tmp_path) == before


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return "a device or other special file"


def _folder(path: Path) -> str:
    path.mkdir()
    return "a folder"


def _link(path: Path) -> str:
    (path.parent / "elsewhere").mkdir()
    (path.parent / "elsewhere" / "notes.txt").write_text("someone else's file\n")
    path.symlink_to(path.parent / "elsewhere" / "notes.txt")
    return "a symbolic link"


@pytest.mark.parametrize("make", [_fifo, _folder, _link])
def test_submit_writes_only_a_regular_file(run_copy, tmp_path, monkeypatch, make):
    run, data = run_copy
    output = tmp_path / "out.csv"
    kind = make(output)
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        result = invoke(["submit", run, "--data-dir", data, "--output", output, *force], tmp_path, monkeypatch)
        assert result.exit_code == 2
        assert one_line(result) == (f"error: {output}: {kind}; a submission is written only as a regular file: "
                                    f"choose another --output")
        assert snapshot(tmp_path) == before and (output.is_symlink() or not output.is_file())


def test_submit_creates_folders_only_inside_the_working_directory(run_copy, tmp_path, monkeypatch):
    run, data = run_copy
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "elsewhere" / "dir" / "sub.csv"
    before = snapshot(tmp_path)
    result = invoke(["submit", run, "--data-dir", data, "-o", outside], work, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {outside.parent}: no such folder, and kaggle-vit creates folders only inside "
                                f"the working directory ({work}); create it first or choose another --output")
    assert snapshot(tmp_path) == before and not (tmp_path / "elsewhere").exists()
    inside = invoke(["submit", run, "--data-dir", data, "-o", "new/dir/sub.csv"], work, monkeypatch)
    assert inside.exit_code == 0, inside.output
    assert len(pd.read_csv(work / "new" / "dir" / "sub.csv")) == 200


# 2. Caches stay inside the data folder and delete only what kaggle-vit wrote.

def test_the_image_cache_never_follows_a_link_out_of_the_data_folder(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train-0123456789abcdef.npy").write_bytes(b"someone else's file")
    (comp / ".kvcache").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {comp / '.kvcache'}: a symbolic link (to {elsewhere}); kaggle-vit writes its "
                                f"image cache only inside the data folder: remove the link")
    assert snapshot(tmp_path) == before and os.listdir(elsewhere) == ["train-0123456789abcdef.npy"]


def test_the_image_cache_deletes_only_files_it_wrote(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    cache = comp / ".kvcache"
    cache.mkdir()
    planted = cache / "train-0123456789abcdef.npy"  # named as a cache, not written by kaggle-vit
    planted.write_bytes(b"someone else's file")
    assert invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch).exit_code == 0
    written = [p for p in cache.glob("train-*.npy") if p != planted]
    assert len(written) == 1
    Image.fromarray(mnist[0][99]).convert("RGB").resize((32, 32)).save(comp / "train" / "3.png")  # a changed file
    before = snapshot(comp, skip=cache)
    assert invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch).exit_code == 0
    assert not written[0].exists()  # its own stale cache is gone
    assert planted.read_bytes() == b"someone else's file" and snapshot(comp, skip=cache) == before


def test_the_image_cache_is_the_same_however_the_data_folder_is_spelt(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "data" / "x", mnist, 20, 5), files_spec(tmp_path)
    assert invoke(["data", "-c", spec, "--dest", "data/x"], tmp_path, monkeypatch).exit_code == 0
    before = snapshot(comp)
    for spelling in (comp, "data/./x", "./data/x/"):
        result = invoke(["data", "-c", spec, "--dest", spelling], tmp_path, monkeypatch)
        assert result.exit_code == 0, result.output
        assert snapshot(comp) == before  # not decoded and written again


# 3. Every path a spec or a CSV names stays inside the competition folder.

@pytest.mark.parametrize("field, key, value", [
    ("train_file", "train", "../outside.csv"),
    ("test_file", "test", "sub/../../outside.csv"),
    ("sample_submission_file", "sample_submission", "ABSOLUTE"),
    ("solution_file", "solution", "../solution.csv"),
    ("train_images", "train_images", ".."),
])
def test_a_spec_path_outside_the_competition_folder_is_refused_when_used(tmp_path, small_spec, mnist, field, key, value):
    # a spec made in Python (the TOML reader refuses these already): reading and building refuse it too
    value = str(tmp_path / "outside.csv") if value == "ABSOLUTE" else value
    spec = dataclasses.replace(small_spec, **{field: value})
    comp = build_small(tmp_path / "c", small_spec, mnist, 60, 20)
    before = snapshot(tmp_path)
    expected = f"{spec.path} [files]: {key} = '{value}' is outside the competition folder {{}}; give a path inside it"
    with pytest.raises(KaggleVitError) as read:
        load_competition(spec, comp)
    assert str(read.value) == expected.format(comp)
    with pytest.raises(KaggleVitError) as build:
        write_competition_files(spec, tmp_path / "new", *(a[:60] for a in mnist[:2]), *(a[:20] for a in mnist[2:]))
    assert str(build.value) == expected.format(tmp_path / "new")
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("how", ["offline build", "unpacking"])
def test_data_never_writes_through_a_link_out_of_dest(comp, tmp_path, monkeypatch, how):
    spec = tmp_path / "digits.toml"
    spec.write_text((BUNDLED / "digit-recognizer.toml").read_text().replace('train = "train.csv"',
                                                                            'train = "sub/train.csv"'))
    dest, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    dest.mkdir()
    elsewhere.mkdir()
    (dest / "sub").symlink_to(elsewhere)
    if how == "unpacking":  # the competition's zip, as Kaggle ships it, holding sub/train.csv
        for name in ("test.csv", "sample_submission.csv"):
            shutil.copy(comp / name, dest / name)
        with zipfile.ZipFile(dest / "digit-recognizer.zip", "w") as zf:
            zf.write(comp / "train.csv", "sub/train.csv")
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", dest, *(["--offline"] if how == "offline build" else [])], tmp_path,
                    monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {dest / 'sub'}: links out of {dest}, and kaggle-vit writes only inside it "
                                f"({spec} [files] train)")
    assert snapshot(tmp_path) == before and not os.listdir(elsewhere)


def test_an_id_that_is_a_path_is_refused(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    Image.fromarray(mnist[0][3]).convert("RGB").save(comp / "secret.png")  # beside the image folder
    frame = pd.read_csv(comp / "trainLabels.csv", dtype=str)
    frame.loc[3, "id"] = "../secret"
    frame.to_csv(comp / "trainLabels.csv", index=False)
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (f"error: {comp / 'trainLabels.csv'}: row 4, column 'id': id '../secret' is a path; an "
                                f"id names a file directly in {comp / 'train'}")
    assert snapshot(tmp_path) == before


# 4. Temporary files of killed runs are removed by the next run.

def test_a_killed_cache_build_leaves_a_file_the_next_run_removes(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 60, 10), files_spec(tmp_path)
    slow = ("import time\nfrom kaggle_vit.data import images\nfast = images.decode\n"
            "images.decode = lambda *a: (time.sleep(0.1), fast(*a))[1]\n")  # time for the kill to land mid-build
    code = (f"import sys\n{slow}from kaggle_vit.cli import main\n"
            f"sys.argv = ['kaggle-vit', 'data', '-c', {str(spec)!r}, '--dest', {str(comp)!r}]\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while not list(comp.rglob("*.tmp")) and proc.poll() is None and time.monotonic() - started < 120:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(comp.rglob("*.tmp"))
    assert left, "the build ended before the kill"
    before = snapshot(comp, skip=comp / ".kvcache")
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert not list(comp.rglob("*.tmp")) and len(list((comp / ".kvcache").glob("train-*.npy"))) == 1
    assert snapshot(comp, skip=comp / ".kvcache") == before


# 5. Bounds: the disk, decompression bombs, 16-bit images.

def test_an_image_cache_larger_than_the_free_disk_is_refused_before_decoding(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 50_000, 50_000))
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert re.fullmatch(rf"error: {re.escape(str(comp / '.kvcache'))}/train-[0-9a-f]{{16}}\.npy: the image cache needs "
                        rf"61.4 KB, but its disk has 50 KB free; free some space or choose a smaller \[image\] size",
                        one_line(result)), result.output
    assert snapshot(tmp_path) == before


def test_a_full_disk_while_the_image_cache_is_built_is_one_line(tmp_path, mnist):
    comp, spec = files_competition(tmp_path / "c", mnist, 60, 10), files_spec(tmp_path)
    before = snapshot(tmp_path)
    proc = _cli(["data", "-c", spec, "--dest", comp], tmp_path, limit_bytes=100_000)
    assert proc.returncode == 2, proc.stderr  # not 135 (SIGBUS)
    assert re.fullmatch(rf"error: {re.escape(str(comp / '.kvcache'))}/train-[0-9a-f]{{16}}\.npy: cannot write the "
                        rf"image cache \(File too large\); it needs 184 KB", _only_line(proc))
    assert snapshot(tmp_path) == before and not list(comp.rglob("*.tmp")) and not list(comp.rglob("*.npy"))


@pytest.mark.parametrize("side, limit", [(12000, 89478485), (20000, 178956970)])
def test_an_image_decompression_bomb_is_refused_in_one_line(tmp_path, mnist, side, limit):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    png_bomb(comp / "train" / "7.png", side)
    before = snapshot(tmp_path)
    proc = _cli(["data", "-c", spec, "--dest", comp], tmp_path)
    assert proc.returncode == 2
    assert _only_line(proc) == (f"error: {comp / 'train' / '7.png'}: refused as a possible decompression bomb: Image "
                                f"size ({side * side} pixels) exceeds limit of {limit} pixels, could be decompression "
                                f"bomb DOS attack")
    assert snapshot(tmp_path) == before and not list(comp.rglob("*.tmp"))


@pytest.mark.parametrize("archive", ["train.csv.zip", "train.csv.gz"])
def test_an_archive_bomb_is_refused_with_nothing_kept(comp, tmp_path, monkeypatch, archive):
    header = "label," + ",".join(f"pixel{i}" for i in range(784)) + "\n"
    payload = header.encode() + (b"1," + b"0," * 783 + b"0\n") * 25_000  # 39 MB that pack into 70 KB
    (comp / "train.csv").unlink()
    if archive.endswith(".zip"):
        with zipfile.ZipFile(comp / archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            zf.writestr("train.csv", payload)
        size = "39.3 MB"
    else:
        (comp / archive).write_bytes(gzip.compress(payload, 9))
        size = "more than 16 MB"  # a gzip states no size: the copy stops at the bound (here its floor)
    before = snapshot(tmp_path)
    result = invoke(["data", "digit-recognizer", "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert re.fullmatch(rf"error: {re.escape(str(comp / archive))}: train.csv unpacks to {size} from 7[\d.]+ KB; refused "
                        rf"as a possible zip bomb \(over 100x\), nothing unpacked", one_line(result)), result.output
    assert snapshot(tmp_path) == before and not (comp / "train.csv").exists() and not list(comp.rglob("*.tmp"))


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path, mnist, monkeypatch):
    tx, ty, vx, _ = mnist
    comp = tmp_path / "c"
    for folder in ("train", "test"):
        (comp / folder).mkdir(parents=True)
    for i in range(20):  # a digit's 8-bit values v as 16 bits: v * 257 spans 0..65535 as v spans 0..255
        Image.fromarray(tx[i].astype(np.uint16) * 257).save(comp / "train" / f"{i}.png")
    for i in range(5):
        Image.fromarray(vx[i].astype(np.uint16) * 257).save(comp / "test" / f"{100 + i}.png")
    assert Image.open(comp / "train" / "0.png").mode == "I;16"
    pd.DataFrame({"id": range(20), "label": ty[:20]}).to_csv(comp / "labels.csv", index=False)
    pd.DataFrame({"id": range(100, 105), "label": 0}).to_csv(comp / "sample_submission.csv", index=False)
    spec = tmp_path / "grey.toml"
    spec.write_text('name = "grey16"\n[files]\nlayout = "files"\ntrain = "labels.csv"\n[columns]\nid = "id"\n'
                    'label = "label"\nsubmission = ["id", "label"]\n[image]\nheight = 28\nwidth = 28\nchannels = 1\n')
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    data = load_competition(load_spec(spec), comp)
    assert np.abs(data.train.images[:, 0].astype(int) - tx[:20]).max() <= 1
    assert np.abs(data.test.images[:, 0].astype(int) - vx[:5]).max() <= 1


# 6. Messages that point at the fix.

def test_the_missing_files_refusal_names_each_and_commands_that_work(tmp_path, monkeypatch):
    spec = tmp_path / "my-digits.toml"  # a spec the package does not ship: commands need -c PATH
    spec.write_text((BUNDLED / "digit-recognizer.toml").read_text())
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "test.csv").write_text("pixel0\n0\n")
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", dest], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (
        f"error: {dest}: train.csv and sample_submission.csv are missing (test.csv is there); get the competition "
        f"with `kaggle competitions download -c digit-recognizer -p {dest}` (kaggle-vit unpacks the zip), or build "
        f"it offline into an empty folder: `kaggle-vit data -c {spec} --offline --dest NEW_DIR`")
    assert snapshot(tmp_path) == before


def test_the_missing_files_refusal_offers_no_offline_build_where_there_is_none(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    shutil.rmtree(comp / "test")
    (comp / "sampleSubmission.csv").unlink()
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (
        f"error: {comp}: test and sampleSubmission.csv are missing (trainLabels.csv and train are there); get the "
        f"competition with `kaggle competitions download -c digits-as-files -p {comp}` (then unzip it there)")
    assert snapshot(tmp_path) == before


def test_a_class_folder_that_is_not_a_class_is_named_as_a_folder(tmp_path, mnist, monkeypatch):
    comp = folders_competition(tmp_path / "c", mnist)
    (comp / "train" / "nine").rename(comp / "train" / "nein")
    spec = tmp_path / "folders.toml"
    spec.write_text('name = "digits-in-folders"\n\n[files]\nlayout = "folders"\n\n[columns]\n'
                    'submission = ["file", "species"]\n\n[image]\nheight = 28\nwidth = 28\nchannels = 1\n\n'
                    f"[classes]\nlabels = {NAMES!r}\n".replace("'", '"'))
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2
    line = one_line(result)
    assert line.startswith(f"error: {comp / 'train' / 'nein'}: class folder 'nein' is not one of the 10 classes "), line
    assert "row" not in line and "column" not in line
    assert snapshot(tmp_path) == before


def test_an_id_without_an_image_says_what_was_tried_and_what_is_there(tmp_path, mnist, monkeypatch):
    comp, spec = files_competition(tmp_path / "c", mnist, 20, 5), files_spec(tmp_path)
    (comp / "train" / "7.png").unlink()
    before = snapshot(tmp_path)
    result = invoke(["data", "-c", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == (
        f"error: {comp / 'trainLabels.csv'}: row 8, column 'id': id '7' has no image file in {comp / 'train'} (tried "
        f"7, 7.png, 7.jpg, 7.jpeg, 7.bmp, 7.tif, 7.tiff; the folder holds 19 image files, such as 0.png, 1.png, "
        f"10.png, ...)")
    assert snapshot(tmp_path) == before


def test_run_folders_of_two_competitions_under_one_folder_keep_their_own_folds(comp, tiny, tmp_path, small_spec,
                                                                               mnist, monkeypatch):
    other = build_small(tmp_path / "other", small_spec, mnist, 300, 100)  # another competition's rows
    parent = tmp_path / "my-runs"
    for data, name in ((comp, "a"), (other, "b")):
        result = invoke(["cv", "--config", tiny, "--data-dir", data, "--run-dir", parent / name, "--fold", "1",
                         "--epochs", "1", "--quiet"], tmp_path, monkeypatch)
        assert result.exit_code == 0, result.output
    assert sorted(os.listdir(parent)) == ["a", "b"]  # nothing written beside the run folders
    assert len(pd.read_csv(parent / "a" / "folds.csv")) == 600 and len(pd.read_csv(parent / "b" / "folds.csv")) == 300


# 7. Errors name the file the user asked for, never the temporary file.

def test_a_full_disk_names_the_file_being_written(run_copy, tmp_path):
    run, data = run_copy
    before = snapshot(tmp_path)
    proc = _cli(["submit", run, "--data-dir", data, "-o", "sub.csv"], tmp_path, limit_bytes=1000)
    assert proc.returncode == 2
    assert _only_line(proc) == "error: sub.csv: File too large"
    assert snapshot(tmp_path) == before


def test_a_folder_in_the_way_names_the_file_being_written(tmp_path, monkeypatch):
    (tmp_path / "nb").mkdir()
    result = invoke(["notebook", "-o", "nb"], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) == "error: nb: Is a directory"
    assert os.listdir(tmp_path) == ["nb"] and not os.listdir(tmp_path / "nb")


def test_a_read_only_folder_names_the_file_being_written(run_copy, tmp_path, monkeypatch, immutable):  # noqa: F811
    run, data = run_copy
    (tmp_path / "ro").mkdir()
    immutable(tmp_path / "ro")
    before = snapshot(tmp_path)
    result = invoke(["submit", run, "--data-dir", data, "-o", "ro/sub.csv"], tmp_path, monkeypatch)
    assert result.exit_code == 2
    assert one_line(result) in ("error: ro/sub.csv: Permission denied", "error: ro/sub.csv: Operation not permitted")
    assert snapshot(tmp_path) == before


# 3. A spec means what it says.

DIGITS = (bundled_dir() / "digit-recognizer.toml").read_text()
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _edited(tmp_path: Path, *edits: tuple[str, str], text: str = DIGITS) -> Path:
    """digit-recognizer's spec with each (old, new) edit made; every old text must be there."""
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def _refused(args: list, cwd: Path, monkeypatch, message: str) -> None:
    """The command exits 2 with one line holding `message`, and changes no file under `cwd`."""
    before = snapshot(cwd)
    result = invoke(args, cwd, monkeypatch)
    assert result.exit_code == 2, result.output
    assert message in one_line(result)
    assert snapshot(cwd) == before


@pytest.mark.parametrize("edit, message", [
    # a misspelt key, at the top level or in any table, names the nearest known one
    (('metric = "accuracy"', 'metrics = "auc"'), "spec.toml: unknown key 'metrics'; did you mean 'metric'?"),
    (('metric = "accuracy"', 'submission_from = "probability"'),
     "spec.toml: unknown key 'submission_from'; did you mean 'submission_form'?"),
    (("[image]", "[imgae]"), "spec.toml: unknown table [imgae]; did you mean [image]?"),
    (("sample_submission =", "sample_submision ="),
     "spec.toml [files]: unknown key 'sample_submision'; did you mean 'sample_submission'?"),
    (("id_start =", "idstart ="), "spec.toml [columns]: unknown key 'idstart'; did you mean 'id_start'?"),
    (("num_classes =", "num_class ="), "spec.toml [classes]: unknown key 'num_class'; did you mean 'num_classes'?"),
    (("split =", "spilt ="), "spec.toml [offline]: unknown key 'spilt'; did you mean 'split'?"),
    # [train] keys and values, checked by `data` too
    (("[offline]", "[train]\nepoch = 3\n\n[offline]"), "spec.toml [train]: unknown key 'epoch'; did you mean 'epochs'?"),
    (("[offline]", '[train]\nepochs = "many"\n\n[offline]'), "spec.toml [train]: epochs = 'many' must be a whole number"),
    (("[offline]", '[train]\naug = "flip-flop"\n\n[offline]'),
     "spec.toml [train]: aug = 'flip-flop' must be one of rotate, affine, flip, crop, none"),
    (("[offline]", '[train]\ncompetition = "cifar-10"\n\n[offline]'),
     "spec.toml [train]: competition cannot be set here: the spec is the competition"),
    # names that become folders, and paths, stay inside their folders
    (('name = "digit-recognizer"', 'name = ""'), "spec.toml: name = '' must be a plain name"),
    (('name = "digit-recognizer"', "name = 5"), "spec.toml: name = 5 must be a plain name"),
    (('name = "digit-recognizer"', 'name = "../../elsewhere"'), "spec.toml: name = '../../elsewhere' must be a plain name"),
    (('slug = "digit-recognizer"', 'slug = "a/../../b"'), "spec.toml: slug = 'a/../../b' must be a plain name"),
    (('train = "train.csv"', 'train = "/etc/passwd"'),
     "spec.toml [files]: train = '/etc/passwd' must be a path inside the competition folder (relative, without '..')"),
    (('test = "test.csv"', 'test = "../digit-recognizer/test.csv"'),
     "spec.toml [files]: test = '../digit-recognizer/test.csv' must be a path inside the competition folder"),
    # bounded sizes, and pixel patterns that name each column
    (("height = 28", "height = 10000000000000000000"), "spec.toml [image]: height = 10000000000000000000 must be at most 4096"),
    (("channels = 1", "channels = 2"), "spec.toml [image]: channels = 2 must be 1 (grey), 3 (RGB) or 4 (RGBA)"),
    (('pixel = "pixel{i}"', 'pixel = "pixel{i}{j}"'), "spec.toml [columns]: pixel = 'pixel{i}{j}' must contain {i}"),
    (('pixel = "pixel{i}"', 'pixel = "pixel{i}{"'), "spec.toml [columns]: pixel = 'pixel{i}{' must contain {i}"),
    # class labels: a pixel CSV holds class numbers, and labels are written as the files spell them
    (('names = ["0"', 'labels = ["zero"'), "spec.toml [classes]: labels = [zero, 1, 2, ...]: a pixel CSV's labels are "
                                            "the class numbers 0..9"),
])
def test_a_spec_fault_is_one_line_when_data_loads_it(comp, tmp_path, monkeypatch, edit, message):
    spec = _edited(tmp_path, edit)
    _refused(["data", "--competition", spec, "--dest", comp], tmp_path, monkeypatch, message)


def test_a_spec_that_is_not_utf8_is_one_line(comp, tmp_path, monkeypatch):
    spec = tmp_path / "spec.toml"
    spec.write_bytes(DIGITS.replace("# Kaggle", "# Kaggle's caf\xe9:", 1).encode("latin-1"))
    _refused(["data", "--competition", spec, "--dest", comp], tmp_path, monkeypatch,
             f"{spec}: line 1: byte 0xe9 is not UTF-8 text; save the file as UTF-8")


@pytest.mark.parametrize("layout, columns, message", [
    ("files", 'submission = ["id", "category"]', "sampleSubmission.csv: row 0: columns id, label, but {spec} expects "
                                                 "id, category ([columns] submission)"),
    ("folders", 'submission = ["file", "label"]', "sample_submission.csv: row 0: columns file, species, but {spec} "
                                                  "expects file, label ([columns] submission)"),
    ("class_probabilities", 'submission = ["id"]', "sampleSubmission.csv: row 0: 2 columns, column 2 'label', but "
                                                   "{spec} expects 11, column 2 'eight' (the id and one per class label)"),
])
def test_the_submission_columns_must_be_the_sample_submissions(tmp_path, mnist, monkeypatch, layout, columns, message):
    data = tmp_path / "data"
    if layout == "folders":
        folders_competition(data, mnist, n_train=30, n_test=5)
        text, old = folders_spec(tmp_path).read_text(), 'submission = ["file", "species"]'
    else:
        files_competition(data, mnist, n_train=30, n_test=5)
        text, old = files_spec(tmp_path).read_text(), 'submission = ["id", "label"]'
    if layout == "class_probabilities":
        text = 'metric = "logloss"\nsubmission_form = "class_probabilities"\n' + text
    spec = _edited(tmp_path, (old, columns), text=text)
    _refused(["data", "--competition", spec, "--dest", data], tmp_path, monkeypatch, message.format(spec=spec))


def test_data_ends_with_what_it_understood(comp, tmp_path, monkeypatch):
    spec = _edited(tmp_path, ("[offline]", '[train]\naug = "rotate"\n\n[offline]'))
    result = invoke(["data", "--competition", spec, "--dest", comp], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        "  600 training images, 200 test images, 1x28x28 (patch sizes that divide it: 2, 4, 7, 14)",
        "  layout pixels, metric accuracy (higher is better), submission ImageId,Label (label)",
        "  10 classes: 0, 1, 2, 3, 4, 5, ...",
        "  [train] aug = 'rotate'"]


def test_integer_labels_stay_integers_with_display_names(comp, tmp_path, monkeypatch):
    """A Fashion-MNIST-like spec: class-number labels in train.csv and the sample submission, and
    display names. The submission holds the numbers Kaggle scores, `score` reads them, and the
    names only show the classes."""
    names = "names = [" + ", ".join(f'"{n}"' for n in FASHION) + "]"
    spec = _edited(tmp_path, ('names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]', names),
                   ('name = "digit-recognizer"', 'name = "fashion-like"'))
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(to_toml(TrainConfig(**TINY)))
    args = ["--competition", spec, "--data-dir", comp]
    shown = invoke(["data", "--competition", spec, "--dest", comp], tmp_path, monkeypatch)
    assert "  10 classes: 0 (T-shirt/top), 1 (Trouser), 2 (Pullover), 3 (Dress), 4 (Coat), 5 (Sandal), ..." in shown.output
    cv = invoke(["cv", *args, "--config", tiny, "--run-dir", tmp_path / "run", "--quiet"], tmp_path, monkeypatch)
    assert cv.exit_code == 0, cv.output
    sub = invoke(["submit", tmp_path / "run", *args, "--output", tmp_path / "submission.csv"], tmp_path, monkeypatch)
    assert sub.exit_code == 0, sub.output
    written = pd.read_csv(tmp_path / "submission.csv", dtype=str)
    assert list(written.columns) == ["ImageId", "Label"] and set(written["Label"]) <= set("0123456789")
    counts = next(line for line in sub.output.splitlines() if "predicted class counts" in line)
    assert any(f"{name}: " in counts for name in FASHION)  # tables show the names
    score = invoke(["score", tmp_path / "submission.csv", *args, "--run-dir", tmp_path / "run"], tmp_path, monkeypatch)
    assert score.exit_code == 0 and "accuracy" in score.output.splitlines()[0], score.output


def test_image_files_with_class_numbers_keep_them_and_show_the_names(tmp_path, mnist, monkeypatch):
    """The same rule for image files: a labels CSV of class numbers, and names to show them."""
    data = files_competition(tmp_path / "data", mnist, n_train=60, n_test=5)
    frame = pd.read_csv(data / "trainLabels.csv", dtype=str)
    frame["label"] = [str(NAMES.index(name)) for name in frame["label"]]
    frame.to_csv(data / "trainLabels.csv", index=False)
    names = "names = [" + ", ".join(f'"{n}"' for n in FASHION) + "]"
    spec = files_spec(tmp_path)
    spec.write_text(spec.read_text() + f"\n[classes]\n{names}\n")
    result = invoke(["data", "--competition", spec, "--dest", data], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "  10 classes: 0 (T-shirt/top), 1 (Trouser), 2 (Pullover), 3 (Dress), 4 (Coat), 5 (Sandal), ..." in result.output


# 5. One line, never a traceback: study storage URLs and stop signals.

FORMS = "sqlite:///FILE, postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB"


def _closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tune_refuses(comp: Path, tiny: Path, tmp_path: Path, monkeypatch, url: str) -> str:
    """Run `tune --storage URL`; assert exit 2, one line, no traceback, no file changed and no study
    anywhere; return the line."""
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = invoke(["tune", "--config", tiny, "--data-dir", comp, "--storage", url], tmp_path, monkeypatch)
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert time.monotonic() - started < 10  # a refused connection is not retried
    assert "s3cret" not in result.output  # the password is masked
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()
    assert not list(tmp_path.rglob("*.db"))
    return line


@pytest.mark.parametrize("url, message", [
    ("garbage", f"--storage garbage: not a database URL; use {FORMS}"),
    ("study.db", "--storage study.db: not a database URL; use sqlite:///study.db"),
    ("sqlite:///{tmp}/missing/study.db",
     ("--storage sqlite:///{tmp}/missing/study.db: folder {tmp}/missing does not exist (tune creates the database "
      "file, not its folder)")),
    ("sqlite://",
     "--storage sqlite://: an in-memory database ends with the command, and the study with it; name a file: sqlite:///PATH"),
    ("sqlite:///{tmp}/data/digit-recognizer/train.csv",
     "--storage sqlite:///{tmp}/data/digit-recognizer/train.csv: cannot open the database: file is not a database"),
    ("oracle://kvit:s3cret@127.0.0.1/optuna",
     (f"--storage oracle://kvit:***@127.0.0.1/optuna: kaggle-vit keeps a study in SQLite, PostgreSQL or MySQL, "
      f"not 'oracle'; use {FORMS}")),
    ("postgres://kvit:s3cret@127.0.0.1/optuna",
     (f"--storage postgres://kvit:***@127.0.0.1/optuna: kaggle-vit keeps a study in SQLite, PostgreSQL or MySQL, "
      f"not 'postgres'; use {FORMS}")),
    ("postgresql://kvit:s3@cret@127.0.0.1/optuna",
     "--storage postgresql://kvit:***@127.0.0.1/optuna: write an '@' in the password as %40"),
])
def test_a_bad_storage_url_is_one_line_and_creates_no_study(comp, tiny, tmp_path, monkeypatch, url, message):
    line = _tune_refuses(comp, tiny, tmp_path, monkeypatch, url.format(tmp=tmp_path))
    assert line == "error: " + message.format(tmp=tmp_path)


def test_an_unreachable_server_is_one_line_at_once(comp, tiny, tmp_path, monkeypatch):
    port = _closed_port()
    line = _tune_refuses(comp, tiny, tmp_path, monkeypatch, f"postgresql://kvit:s3cret@127.0.0.1:{port}/optuna")
    assert re.fullmatch(rf"error: --storage postgresql://kvit:\*\*\*@127\.0\.0\.1:{port}/optuna: cannot open the "
                        rf"database: .*{port}.*Connection refused", line), line


@pytest.mark.parametrize("url, hidden, message", [
    ("mysql://kvit:s3cret@127.0.0.1/optuna", "MySQLdb",
     "MySQL's driver mysqldb is not installed; pip install pymysql and write the URL as mysql+pymysql://..."),
    ("mysql+pymysql://kvit:s3cret@127.0.0.1/optuna", "pymysql", "MySQL's driver pymysql is not installed; pip install pymysql"),
    ("postgresql+psycopg://kvit:s3cret@127.0.0.1/optuna", "psycopg",
     "PostgreSQL's driver psycopg is not installed; pip install 'kaggle-vit[postgres]'"),
    ("postgresql+psycopg2://kvit:s3cret@127.0.0.1/optuna", "psycopg2",
     ("PostgreSQL's driver psycopg2 is not installed; pip install 'kaggle-vit[postgres]' and write the URL as "
      "postgresql+psycopg://...")),
])
def test_a_missing_driver_gets_the_hint_for_its_database(comp, tiny, tmp_path, monkeypatch, url, hidden, message):
    monkeypatch.setitem(sys.modules, hidden, None)  # importing it fails, installed or not
    line = _tune_refuses(comp, tiny, tmp_path, monkeypatch, url)
    assert line == f"error: --storage {url.replace('s3cret', '***')}: {message}"


def test_run_tune_checks_the_storage_before_making_its_folder(comp, tmp_path):
    from kaggle_vit.tune import run_tune

    data = load_competition(load_spec("digit-recognizer"), comp)
    with pytest.raises(KaggleVitError, match="folder .*missing does not exist"):
        run_tune(data, TrainConfig(**TINY), tmp_path / "tune", f"sqlite:///{tmp_path}/missing/study.db", trials=1)
    assert not (tmp_path / "tune").exists() and not (tmp_path / "missing").exists()


# A worker's exit: Python runs its atexit callbacks (for a second or so with torch loaded) after the
# worker's last fold; a `cv` stopped then (Ctrl-C, SIGTERM) stops that worker too.
SLOW_EXIT = '''import atexit, os, time

def _slow_exit():
    mark = os.environ.get("KVIT_TEST_EXIT_MARK")
    if mark:
        open(mark, "w").close()
        time.sleep(30)

atexit.register(_slow_exit)
'''


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_worker_stopped_while_python_exits_prints_nothing(comp, tmp_path, monkeypatch, capfd, signum):
    import concurrent.futures as cf
    import multiprocessing as mp

    from kaggle_vit.run import jobs

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_EXIT)  # every worker's Python holds its exit open
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("KVIT_TEST_EXIT_MARK", str(tmp_path / "exiting"))
    data = load_competition(load_spec("digit-recognizer"), comp)
    before = {p: d for p, d in snapshot(comp).items() if "kvcache" not in p}
    run = tmp_path / "run"
    run.mkdir()
    staging, shared = jobs._share(data, np.ones(len(data.train), dtype=np.int64), run)
    ctx = mp.get_context("spawn")
    devices, events = ctx.Queue(), ctx.Queue()
    devices.put("cpu")
    pool = cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=jobs._start_worker,
                                  initargs=(TrainConfig(**TINY), shared, run, 1, os.getpid(), devices, events))
    pid = pool.submit(os.getpid).result(timeout=120)  # the worker has set up
    (worker,) = [p for p in mp.active_children() if p.pid == pid]
    pool.shutdown(wait=False)  # no fold for it: it ends as one that finished its folds
    started = time.monotonic()
    while not (tmp_path / "exiting").exists() and worker.is_alive() and time.monotonic() - started < 120:
        time.sleep(0.02)
    assert (tmp_path / "exiting").exists(), f"the worker never reached its exit (status {worker.exitcode})"
    if signum == signal.SIGTERM:
        jobs._stop([worker])  # what `cv` does to its workers on Ctrl-C or SIGTERM
    else:
        os.kill(pid, signum)
        worker.join(timeout=20)
    shutil.rmtree(staging)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == "", captured.err
    assert worker.exitcode == 128 + signum
    assert not list(run.rglob("*.tmp"))
    assert {p: d for p, d in snapshot(comp).items() if "kvcache" not in p} == before


def test_a_stop_signal_inside_a_callback_still_ends_the_worker_quietly(tmp_path):
    # Python prints and ignores an exception raised in a weakref callback (or a __del__, an atexit
    # callback), so a SIGTERM that lands there must end the worker some other way.
    code = ("import sys, time, types, weakref\n"
            "from kaggle_vit.run import jobs\n"
            "jobs.stop_quietly()\n"
            "jobs._worker = types.SimpleNamespace(in_fold=True)  # in a fold: a stop signal unwinds\n"
            "class Held: pass\n"
            "held = Held()\n"
            "ref = weakref.ref(held, lambda _: (print('in callback', flush=True), time.sleep(30)))\n"
            "del held\n"
            "print('went on', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "in callback\n"
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM
    assert stdout == "" and stderr == "", stderr
