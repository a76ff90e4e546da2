"""The cv run folder: every file name in it is spelled here and nowhere else, and its records
(`kaggle_vit.records`: the epoch, the fold result, the run metrics, the checkpoint header) are read
and written here, by the readers that decide whether a fold is usable, so `cv` (deciding what is
finished) and `submit`/`report` (using it) read a damaged file the same way (a fold checkpoint's
format: `models.checkpoint`)."""
from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd

from ..errors import KaggleVitError
from ..io import HOST, atomic_path, read_json, write_json, write_new
from ..models.checkpoint import checkpoint_header, save_checkpoint
from ..records import CheckpointHeader, EpochRecord, FoldClaim, FoldResult, RunMetrics, to_json

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..spec import CompetitionSpec

OLD_FORMAT = "in the old pickle format, which is never loaded (a pickle can run code)"
METRICS = "metrics.json"
# NFS emulates flock with POSIX locks, which are the process's, not the file handle's: two threads
# of one process would both get it, and either closing its file would unlock the other's. So a
# process's threads take the run folder's lock one at a time.
_ONE_THREAD = threading.Lock()
STAGING = re.compile(r"^\.arrays-(\d+)@([A-Za-z0-9-]*)-")  # .arrays-PID@HOST-RANDOM: whose workers use it
T = TypeVar("T")


class _File:
    """A file of a run or fold folder, named once: `RunDir(root).metrics` is root/metrics.json."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<file {self.name}>"

    def __get__(self, folder: Any, owner: type | None = None) -> Any:
        return self if folder is None else folder.root / self.name  # on the class (help()): the name


def _read(path: Path, reader: Callable[[Path], T]) -> T:
    """`reader(path)`; a file it cannot read is one line naming it, never a traceback or a silent
    recomputation."""
    try:
        return reader(path)
    except Exception as error:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        raise KaggleVitError(f"{path}: unreadable ({type(error).__name__}); rerun `kaggle-vit cv` with the same "
                             f"settings to rewrite it") from None


def _result(path: Path) -> FoldResult:
    return FoldResult.from_json(read_json(path))


def _claim(path: Path) -> FoldClaim:
    return FoldClaim.from_json(read_json(path))


def _history(path: Path) -> list[EpochRecord]:
    return [EpochRecord.from_json(row) for row in pd.read_csv(path).to_dict("records")]


def _test_probs(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        probs = np.load(fh, allow_pickle=False)
    if not isinstance(probs, np.ndarray):
        raise ValueError("not an .npy array")
    return probs


def _valid_probs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
        if "probs_plain" in z.files:  # kaggle-vit up to 9032e2c: `probs` were with the views
            return z["rows"], z["probs_plain"], z["probs"]
        return z["rows"], z["probs"], z["probs_views"]


@dataclass(frozen=True)
class FoldDir:
    """runs/.../foldK: one fold's checkpoint, training state, history, probabilities and result."""

    root: Path
    number: int

    model = _File("model.safetensors")  # the best epoch's weights; its CheckpointHeader as JSON
    old_model = _File("model.pt")  # where kaggle-vit before safetensors kept the weights, as a pickle: never read
    state = _File("state.pt")  # the last epoch's training state; only while the fold is unfinished
    history = _File("history.csv")  # an EpochRecord a row
    valid_probs = _File("valid_probs.npz")  # the fold's rows and their probabilities, plain and with the views
    test_probs = _File("test_probs.npy")  # test.csv's probabilities under the run's test-time views
    result = _File("result.json")  # the FoldResult, written last: it marks the fold finished
    claim = _File("claim.json")  # the FoldClaim of the process training the fold, while it does (`run.claims`)

    def _load(self, path: Path, reader: Callable[[Path], T]) -> tuple[T | None, str | None]:
        """(contents, None), or (None, 'PATH is missing' / 'unreadable' / in the old format)."""
        if not path.exists():
            if path == self.model and self.old_model.exists():
                return None, f"{self.old_model} is {OLD_FORMAT}"
            return None, f"{path} is missing"
        try:
            return reader(path), None
        except Exception:  # noqa: BLE001 - whatever the reader raises, the file is unusable
            return None, f"{path} is unreadable"

    def problem(self) -> str | None:
        """Why a fold that wrote result.json cannot be used ('RUN/foldK/model.safetensors is unreadable'), or None."""
        files = ((self.result, _result), (self.model, checkpoint_header), (self.valid_probs, _valid_probs),
                 (self.test_probs, _test_probs))
        return next((problem for path, reader in files if (problem := self._load(path, reader)[1])), None)

    def write_checkpoint(self, state_dict: "dict[str, torch.Tensor]", header: CheckpointHeader) -> None:
        """The best epoch's weights with their header (safetensors, atomically)."""
        save_checkpoint(self.model, state_dict, header)
        self.old_model.unlink(missing_ok=True)  # an older kaggle-vit's pickle, retrained: nothing may load it

    def read_checkpoint(self, spec: CompetitionSpec | None = None) -> CheckpointHeader:
        """The checkpoint's header, read without torch (its tensor bytes checked against their digest)
        and, given `spec`, refused when trained for another image size or class count; a missing,
        damaged or old-format one is named with the way to retrain it."""
        header, problem = self._load(self.model, checkpoint_header)
        if problem:
            raise KaggleVitError(f"fold {self.number}'s checkpoint {problem}: rerun `kaggle-vit cv` with the same "
                                 f"settings to retrain it")
        want = None if spec is None else ((spec.channels, spec.height, spec.width), spec.num_classes)
        if want is not None and (header.input_size, header.num_classes) != want:
            raise KaggleVitError(f"{self.model}: trained on {header.input_size} images with {header.num_classes} "
                                 f"classes, but {spec.name} has {want[0]} and {want[1]}")
        return header

    def read_model(self, spec: CompetitionSpec | None = None) -> "nn.Module":
        """The fold's best model, in eval mode (its checkpoint checked as `read_checkpoint` checks it)."""
        from safetensors.torch import load_file  # lazy: torch only for a model; probabilities and headers need none

        from ..models.factory import model_from  # lazy: torch and timm, likewise

        header = self.read_checkpoint(spec)
        try:
            weights = load_file(self.model)
        except Exception:  # noqa: BLE001 - whatever safetensors raises, the file is unusable
            raise KaggleVitError(f"fold {self.number}'s checkpoint {self.model} is unreadable: rerun `kaggle-vit cv` "
                                 f"with the same settings to retrain it") from None
        return model_from(header, weights)

    def write_history(self, history: list[EpochRecord]) -> None:
        """Every epoch's record, a row each."""
        with atomic_path(self.history) as tmp:
            pd.DataFrame([to_json(record) for record in history]).to_csv(tmp, index=False)

    def read_history(self) -> list[EpochRecord]:
        """Every epoch's record, for the curves; a damaged file is one line."""
        return _read(self.history, _history)

    def write_valid_probs(self, rows: np.ndarray, probs: np.ndarray, probs_views: np.ndarray) -> None:
        """The fold's validation rows and their probabilities, plain and with the test-time views."""
        with atomic_path(self.valid_probs) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, rows=rows, probs=probs, probs_views=probs_views)

    def read_valid_probs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fold's rows (of train.csv) and their probabilities: plain, and with the test-time views."""
        return _read(self.valid_probs, _valid_probs)

    def write_test_probs(self, probs: np.ndarray) -> None:
        """test.csv's probabilities under the run's test-time views (.npy)."""
        with atomic_path(self.test_probs) as tmp, open(tmp, "wb") as fh:
            np.save(fh, probs)

    def read_test_probs(self) -> np.ndarray:
        """The saved test probabilities (an .npy array, never a pickle); a damaged file is one line
        naming it, never silently predicted again."""
        return _read(self.test_probs, _test_probs)

    def write_result(self, result: FoldResult) -> None:
        """The fold's result, written last: it marks the fold finished."""
        write_json(self.result, to_json(result))

    def read_result(self) -> FoldResult:
        """The finished fold's result (a file of the old names read in today's); a damaged one is one line."""
        return _read(self.result, _result)

    def read_claim(self) -> tuple[FoldClaim | None, str | None]:
        """The fold's claim, or (None, 'RUN/foldK/claim.json is unreadable'); (None, None) when no
        process claims the fold."""
        return self._load(self.claim, _claim) if self.claim.exists() else (None, None)

    def create_claim(self, claim: FoldClaim) -> bool:
        """Claim the fold unless a claim exists (False then)."""
        return write_new(self.claim, json.dumps(to_json(claim), indent=2) + "\n")

    def write_claim(self, claim: FoldClaim) -> None:
        """Rewrite this process's claim (its heartbeat)."""
        write_json(self.claim, to_json(claim))


@dataclass(frozen=True)
class RunDir:
    """A run folder: resolved config, folds, per-fold files, OOF predictions, metrics and plots."""

    root: Path

    config = _File("config.toml")  # the resolved settings; `cv --config` reads it back
    folds = _File("folds.csv")
    plan = _File("plan.json")  # the schedule the folds train to (`schedule.Plan`): kept, so a resumed run keeps it
    oof = _File("oof.csv")
    metrics = _File(METRICS)  # the RunMetrics
    lock = _File(".lock")  # locked while a process writes what the processes sharing the folder share

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder's lock (fcntl.flock on .lock), which every process sharing the folder,
        on this machine or another, takes to write the shared files and the folds' claims."""
        with _ONE_THREAD, open(self.lock, "a") as fh:  # "a": created where missing, never emptied
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except OSError as error:
                raise KaggleVitError(f"{self.lock}: cannot lock it ({error.strerror}); processes sharing a run "
                                     f"folder need a file system with locks (NFS has them; Lustre needs its flock "
                                     f"mount option)") from None
            yield  # the file closed after: unlocked

    def plot(self, name: str) -> Path:
        """A view of the run: curves, confusion, test_predictions, mistakes, attention."""
        return self.root / f"{name}.png"

    def fold(self, k: int) -> FoldDir:
        """Fold k's folder (from 1)."""
        return FoldDir(self.root / f"fold{k}", k)

    def write_metrics(self, metrics: RunMetrics) -> None:
        """The run's metrics, rewritten by each cv call."""
        write_json(self.metrics, to_json(metrics))

    def read_metrics(self) -> RunMetrics:
        """The run's metrics; a folder that is no run, or a damaged file, is one line."""
        if not self.metrics.exists():
            raise KaggleVitError(f"{self.root}: not a kaggle-vit run (no {METRICS})")
        return _read(self.metrics, lambda path: RunMetrics.from_json(read_json(path)))

    def read_oof(self, folds: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The folds' validation rows (of train.csv) in row order, each row's fold, and their
        probabilities: plain, and with the test-time views."""
        parts = {k: self.fold(k).read_valid_probs() for k in folds}
        rows, plain, views = (np.concatenate([part[i] for part in parts.values()]) for i in range(3))
        fold_of_row = np.concatenate([np.full(len(part[0]), k) for k, part in parts.items()])
        order = np.argsort(rows, kind="stable")
        return rows[order], fold_of_row[order], plain[order], views[order]

    def finished_folds(self, n_folds: int | None = None) -> list[int]:
        """The folds that wrote their result, of the run's fold count."""
        n_folds = self.read_metrics().n_folds if n_folds is None else n_folds
        return [k for k in range(1, n_folds + 1) if self.fold(k).result.exists()]

    def histories(self, folds: list[int]) -> dict[int, list[EpochRecord]]:
        """Every epoch's record of each fold, for the curves."""
        return {k: self.fold(k).read_history() for k in folds}

    def new_staging(self) -> Path:
        """A private folder for the fold workers' setup and any array no cache file holds
        (`.arrays-PID@HOST-*`, removed after)."""
        return Path(tempfile.mkdtemp(prefix=f".arrays-{os.getpid()}@{HOST}-", dir=self.root))

    def stagings(self) -> list[tuple[int, Path]]:
        """(pid, folder) of this machine's staging folders present, left behind when a cv was killed
        (another machine sharing the run folder keeps its own)."""
        found = [(STAGING.match(p.name), p) for p in self.root.glob(".arrays-*")]
        return [(int(match[1]), p) for match, p in found if match and match[2] == HOST]


def shared_folds(run_dir: Path, competition: str, n_folds: int, seed: int, runs_root: Path | None = None) -> Path:
    """Where a run's fold assignment is kept: shared by every run of a competition with these folds
    and seed in its runs folder (runs/COMPETITION, or `runs_root`); for a run folder elsewhere
    (--run-dir), its own folds.csv, so two competitions' runs under one folder never share one."""
    root = runs_root or run_dir.parent
    if runs_root is None and root.name != competition:
        return RunDir(run_dir).folds
    return root / f"folds-k{n_folds}-seed{seed}.csv"


def runs_of(competition_runs: Path) -> list[Path]:
    """The run folders under runs/COMPETITION (those that wrote metrics)."""
    return [p.parent for p in competition_runs.glob(f"*/{METRICS}")]
