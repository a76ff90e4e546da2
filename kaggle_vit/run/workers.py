"""Folds trained at once in worker processes on one machine (`cv --jobs N`), over its cores or GPUs.

On a small CPU, two single-threaded processes train more images per second between them than one
process with two threads (small matrices leave the second thread idle much of the time). Each
worker process lives for the whole run and trains the fold segments its slot is given, one after
another: `fold.train_fold` for a whole fold, exactly as the sequential loop runs it, or for a
segment of its epochs (`plan_segments` cuts a fold between two workers so that five folds keep
two cores busy to the end). One process per slot, not per fold, pays the imports (seconds of
torch and timm) once. It reports to the parent through its own pipe and gets segments through another.

What a user must never see from a worker, and how: a worker is a plain `python -m
kaggle_vit.run.workers JOB OUT IN` process that reads its setup from a file written before it starts,
maps the images from the competition's caches itself (the pages the parent reads, never a copy:
`SharedData`), and gets each segment as one small message, so a parent killed
while workers start leaves none reading half a pickle; it runs in its own session, so Ctrl-C
reaches only the parent, which stops the workers with SIGTERM (temporary files are cleaned,
nothing printed, even from a worker that is exiting: `stop_quietly`), as it does when it gets
SIGTERM itself (`timeout`, `kill`); no semaphores exist
(pipes, not queues), so none can leak; and a worker whose parent dies (SIGKILL) stops within a
fraction of a second, whatever it is doing (`watch_parent`), so a killed `cv` leaves no orphan
training, predicting or writing into the run folder.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from ..config import TrainConfig
from ..data.cache import MappedRows, mapped_rows
from ..data.layouts import CompetitionData
from ..data.tables import ImageTable
from ..errors import Interrupted, KaggleVitError
from ..io import atomic_path, is_running
from ..notices import log, notice
from ..spec import CompetitionSpec
from ..train.batches import easy_share, skips_rows
from ..train.engine import validates
from .fold import train_fold
from .pseudo import pseudo_labels
from .rundir import RunDir

STEP_EVERY = 25  # steps between progress messages from a worker
PARENT_POLL_S = 0.2  # how often a worker checks that its parent is alive


class Segment(NamedTuple):
    """Epochs `first`..`last` of one fold, trained by one worker; the segment that reaches the
    fold's last epoch also predicts with the best model."""

    fold: int
    first: int
    last: int


def plan_segments(todo: list[int], epochs: int, jobs: int, epoch_cost: float | Sequence[float] = 1.0,
                  predict_cost: float = 1.0) -> list[list[Segment]]:
    """Spread the folds over `jobs` workers so that each gets an equal share of the work, cutting at
    most one fold per worker at an epoch boundary (McNaughton's wrap-around rule): folds are laid
    end to end, each with its last epochs and prediction first, and cut at every multiple of the
    share, moved to the nearest epoch boundary. A cut fold's tail closes one worker's list and its
    head opens the next one's, so the head runs first. Costs are relative: an epoch's (one for
    all, or one per epoch when epochs differ, as with `skip_easy`) and a fold's final prediction's.
    Cuts are placed from absolute positions, so rounding never piles up on the last worker."""
    costs = [float(epoch_cost)] * epochs if isinstance(epoch_cost, (int, float)) else [float(c) for c in epoch_cost]
    fold_cost = sum(costs) + predict_cost
    share = len(todo) * fold_cost / jobs
    # offsets inside a fold where a worker may stop: before it, after a tail of t = 1..epochs-1
    # epochs and the prediction, or after all of it
    stops = [0.0] + [predict_cost + sum(costs[epochs - t:]) for t in range(1, epochs)] + [fold_cost]
    cuts: dict[int, int] = {}  # fold index -> epochs of its tail left to the worker before the cut
    for w in range(1, jobs):
        index = min(int(w * share // fold_cost), len(todo) - 1)
        offset = w * share - index * fold_cost
        tail = min(range(len(stops)), key=lambda t: abs(stops[t] - offset))
        if tail == epochs:  # after the whole fold: the next fold opens the next worker
            index, tail = index + 1, 0
        cuts[index] = tail
    plans: list[list[Segment]] = [[]]
    for index, fold in enumerate(todo):
        tail = cuts.get(index)
        if tail:
            plans[-1].append(Segment(fold, epochs - tail + 1, epochs))
            plans.append([Segment(fold, 1, epochs - tail)])
            continue
        if tail == 0:
            plans.append([])
        plans[-1].append(Segment(fold, 1, epochs))
    return plans


# A training image costs about this many inference passes (forward, backward, optimiser), as
# measured in cv on a CPU (docs/training.md, "Folds in parallel").
TRAIN_PASSES = 3.5


def plan_costs(data: CompetitionData, folds: np.ndarray, cfg: TrainConfig) -> tuple[list[float], float]:
    """Each epoch's and a final prediction's cost in inference passes: a training image (pseudo-labelled
    test rows included) costs TRAIN_PASSES, a validation image one, and prediction one per view of
    every test image and of every validation image but the plain one. With `skip_easy`, the middle
    epochs train on the rows they keep (`easy_share`); with `valid_every`, only the epochs
    `engine.validates` names pay for validation."""
    n_valid = len(folds) / cfg.folds
    n_pseudo = (np.mean([len(pseudo_labels(Path(cfg.pseudo), k, cfg.pseudo_threshold)[0]) for k in range(1, cfg.folds + 1)])
                if cfg.pseudo else 0.0)
    n_train = len(folds) - n_valid + n_pseudo
    epochs = range(1, cfg.epochs + 1)
    kept = [1.0 - cfg.skip_easy * easy_share(epoch) if skips_rows(epoch, cfg) else 1.0 for epoch in epochs]
    checked = [n_valid if validates(epoch, cfg) else 0.0 for epoch in epochs]
    # the validation rows' plain view is the best epoch's validation (fold._predict)
    return ([TRAIN_PASSES * n_train * k + v for k, v in zip(kept, checked)],
            cfg.tta * len(data.test.images) + (cfg.tta - 1) * n_valid)


def worker_env(device: str, environ: dict[str, str]) -> tuple[dict[str, str], str]:
    """A worker's environment and the device it names: a GPU worker sees only its GPU (as cuda),
    counted within the parent's CUDA_VISIBLE_DEVICES when that is set, so a fold runs the same
    code on whichever GPU it lands."""
    if not device.startswith("cuda"):
        return dict(environ), device
    index = int(device.partition(":")[2] or 0)
    visible = [v for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return {**environ, "CUDA_VISIBLE_DEVICES": visible[index] if visible else str(index)}, "cuda"


class PipeProgress:
    """A worker's Progress: sends fold events to the parent; exits if the pipe to it broke."""

    def __init__(self, conn: Connection, fold: int):
        self.conn = conn
        self.begin(fold)

    def begin(self, fold: int) -> None:
        """Report a new segment, of `fold`, counting its steps from zero."""
        self.fold, self.steps, self.images, self.loss = fold, 0, 0, 0.0

    def send(self, kind: str, payload) -> None:
        try:
            self.conn.send((kind, self.fold, payload))
        except OSError:  # the pipe broke: the parent is gone, and nobody is left to tell
            os._exit(1)

    def start_fold(self, fold: int, folds: int) -> None:
        self.send("start_fold", folds)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.send("start_epoch", (epoch, epochs, steps))

    def step(self, loss: float | None, images: int) -> None:
        self.steps, self.images, self.loss = self.steps + 1, self.images + images, loss
        if self.steps % STEP_EVERY == 0:
            self.send("step", (STEP_EVERY, self.images, loss))
            self.images = 0

    def end_epoch(self, record: dict) -> None:
        self.send("end_epoch", record)

    def end_fold(self, summary: dict) -> None:
        self.send("end_fold", summary)


class _ForwardNotices(logging.Handler):
    """A worker's notices (fold resumed, cache rebuilt) go to the parent, which prints them."""

    def __init__(self, progress: PipeProgress):
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.send("notice", record.getMessage())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds, so atomic writes in progress remove their temp files


def _exit_now(signum, frame) -> None:
    os._exit(128 + signum)  # the work is over, nothing is left to clean: Python's exit is not interrupted


def _exit_unraisable(args) -> None:
    """A stop signal's SystemExit raised where Python cannot pass it on (a weakref callback, a `__del__`)
    would be printed and ignored, and the worker would go on: it exits now, quietly."""
    if issubclass(args.exc_type, SystemExit):
        os._exit(args.exc_value.code if isinstance(args.exc_value.code, int) else 1)
    sys.__unraisablehook__(args)


@contextmanager
def stop_quietly() -> Iterator[None]:
    """SIGTERM (how the parent stops a worker) or SIGINT ends this process without a word, whatever
    it is doing: inside the block by unwinding, so atomic writes remove their temporary files; after
    it (Python's exit, atexit callbacks included, where an exception is printed) at once."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_on_signal)
    previous, sys.unraisablehook = sys.unraisablehook, _exit_unraisable
    try:
        yield
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _exit_now)
        sys.unraisablehook = previous


def watch_parent(parent: int, every: float = PARENT_POLL_S) -> None:
    """Stop this process within `every` seconds of its parent's death, whatever it is doing (a long
    validation or prediction reports nothing to notice it by), through SIGTERM, so that it unwinds
    as when the parent stops it: a killed `cv` leaves no worker behind."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


@dataclass(frozen=True)
class SharedData:
    """A competition's data as a worker opens it: each image array as the rows of the file the
    parent maps it from (its cache), so every process reads the same pages; the labels, ids and
    fold of each row, small, as they are."""

    spec: CompetitionSpec
    data_dir: Path
    train_images: MappedRows
    train_labels: np.ndarray
    train_ids: np.ndarray
    test_images: MappedRows
    test_ids: np.ndarray
    folds: np.ndarray

    def open(self) -> tuple[CompetitionData, np.ndarray]:
        """The data and the fold of each row, the images memory-mapped."""
        train = ImageTable(self.train_images.open(), self.train_labels, self.train_ids)
        test = ImageTable(self.test_images.open(), None, self.test_ids)
        return CompetitionData(self.spec, self.data_dir, train, test), self.folds


def _share(data: CompetitionData, folds: np.ndarray, run_dir: Path) -> tuple[Path, SharedData]:
    """A private folder of the run for the workers' setup (removed when they end; those left by a
    killed cv are removed first), and the data as they open it: the image arrays from their caches;
    an array that is in memory only (not loaded from a cache) is written to the folder, once."""
    run = RunDir(run_dir)
    for pid, stale in run.stagings():  # left by a cv that was killed
        if not is_running(pid):
            shutil.rmtree(stale, ignore_errors=True)
    staging = run.new_staging()

    def mapped(images: np.ndarray, name: str) -> MappedRows:
        rows = mapped_rows(images)
        if rows is None:
            with atomic_path(staging / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, images)
            rows = mapped_rows(np.load(staging / f"{name}.npy", mmap_mode="c", allow_pickle=False))
        return rows

    small = [np.asarray(a) for a in (data.train.labels, data.train.ids, data.test.ids, folds)]  # pickled as they are
    shared = SharedData(data.spec, data.data_dir, mapped(data.train.images, "train_images"), *small[:2],
                        mapped(data.test.images, "test_images"), *small[2:])
    return staging, shared


def _worker(job: Path, fd_out: int, fd_in: int) -> None:
    """Process entry point: with the setup in `job` (written by `_start` before the process; the
    images are mapped from the files `SharedData` names), train the fold segments the parent
    sends through the pipe `fd_in`, one after another, reporting through `fd_out`. A closed `fd_in`
    (no more work, or the parent is gone) ends the process."""
    with stop_quietly():
        outbox, inbox = Connection(fd_out), Connection(fd_in, writable=False)
        cfg, shared, run_dir, threads, parent = pickle.loads(job.read_bytes())
        watch_parent(parent)
        torch.set_num_threads(threads)
        data, folds = shared.open()
        progress = PipeProgress(outbox, 0)
        log.addHandler(_ForwardNotices(progress))
        log.propagate = False
        while True:
            try:
                segment = Segment(*inbox.recv())
            except (EOFError, OSError):
                return
            progress.begin(segment.fold)
            _train_segment(cfg, data, folds, run_dir, segment, progress)
            progress.send("done", None)


def _train_segment(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, run_dir: Path, segment: Segment,
                   progress: PipeProgress) -> None:
    """One segment in a worker; a failure is sent to the parent as one line naming the fold, and ends the worker."""
    try:
        train_fold(cfg, data, folds, segment.fold, run_dir, progress, until_epoch=segment.last,
                   handover=segment.first > 1)
    except KaggleVitError as exc:
        progress.send("error", str(exc))
        sys.exit(1)
    except Exception:  # noqa: BLE001 - a bug: its last line goes to the parent, which names the fold
        last = traceback.format_exc(limit=4).strip().splitlines()[-1]
        progress.send("error", f"fold {segment.fold}: {last}")
        sys.exit(1)


class FoldRelay:
    """Turns worker events back into calls on the user's Progress: the live display follows one
    fold at a time (the next running one when it ends); every fold's end is passed on. It also
    keeps which epoch each running fold is in, for the Ctrl-C message."""

    def __init__(self, progress):
        self.progress, self.shown, self.n_folds = progress, None, 0
        self.running: dict[int, tuple[int, int]] = {}

    def handle(self, kind: str, fold: int, payload) -> None:
        if kind == "notice":
            notice(payload)
            return
        if kind == "start_fold":
            self.n_folds = payload
            self.running[fold] = (0, 0)
        elif kind == "start_epoch":
            self.running[fold] = payload[:2]
            if self.shown is None:
                self.shown = fold
                self.progress.start_fold(fold, self.n_folds)
        if kind == "end_fold":
            self.running.pop(fold, None)
            self.progress.end_fold(payload)
            self.shown = None if fold == self.shown else self.shown
        elif fold == self.shown and kind == "start_epoch":
            self.progress.start_epoch(*payload)
        elif fold == self.shown and kind == "step":
            steps, images, loss = payload
            for i in range(steps):
                self.progress.step(loss, images if i == 0 else 0)
        elif fold == self.shown and kind == "end_epoch":
            self.progress.end_epoch(payload)

    def pause(self, fold: int) -> None:
        """A fold's first segment ended: it leaves the display until another worker takes it on."""
        self.running.pop(fold, None)
        self.shown = None if fold == self.shown else self.shown


class _Slot:
    """A worker process and its two pipes; `segment` is what it trains now (None while idle), `last`
    the segment it was given last (it names the fold if the worker fails)."""

    def __init__(self, proc: subprocess.Popen, inbox: Connection, outbox: Connection):
        self.proc, self.inbox, self.outbox = proc, inbox, outbox
        self.segment: Segment | None = None
        self.last: Segment | None = None


def _start(cfg: TrainConfig, shared: SharedData, staging: Path, slot: int, run_dir: Path,
           threads: int, device: str) -> _Slot:
    """Start slot `slot`'s worker on `device` in its own session (Ctrl-C goes to the parent alone),
    with the package importable as this process imports it (a notebook may have put it on sys.path);
    it trains whatever segments `_assign` sends it."""
    env, device = worker_env(device, dict(os.environ))
    job = staging / f"worker{slot}.pkl"
    with atomic_path(job) as tmp:
        tmp.write_bytes(pickle.dumps((dataclasses.replace(cfg, device=device), shared, run_dir, threads, os.getpid())))
    from_worker, to_parent = os.pipe()
    from_parent, to_worker = os.pipe()
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "kaggle_vit.run.workers", str(job), str(to_parent), str(from_parent)],
                                pass_fds=(to_parent, from_parent), start_new_session=True, env=env)
    except BaseException:
        os.close(from_worker)
        os.close(to_worker)
        raise
    finally:
        os.close(to_parent)
        os.close(from_parent)
    return _Slot(proc, Connection(from_worker), Connection(to_worker, readable=False))


def _assign(slot: _Slot, segment: Segment) -> None:
    """Give an idle worker its next segment (a few bytes: one write, never half a message)."""
    slot.segment = slot.last = segment
    slot.outbox.send(tuple(segment))


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_folds_parallel(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, todo: list[int], run_dir: Path,
                         jobs: int, progress, devices: list[str] | None = None) -> None:
    """Train the `todo` folds on `jobs` workers at once, as `plan_segments` shares them out (a fold
    cut between two workers moves through its state file; its second segment waits for its
    first), worker i on devices[i % n] with an equal share of the cores. The plan and the thread
    counts, and so every fold's numbers, do not depend on timing. Raises KaggleVitError naming the
    fold if a worker fails, and Interrupted (after stopping the workers) on Ctrl-C."""
    devices, jobs = devices or ["cpu"], max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    queues = [deque(plan) for plan in plan_segments(todo, cfg.epochs, jobs, *plan_costs(data, folds, cfg))]
    slots: dict[int, _Slot] = {}
    relay, errors, stopped, handed = FoldRelay(progress), {}, {}, set()
    staging, shared = _share(data, folds, run_dir)

    def receive(slot: _Slot) -> bool:
        """Handle every message waiting from `slot`'s worker; False once the worker has closed its pipe."""
        try:
            while slot.inbox.poll():
                kind, fold, payload = slot.inbox.recv()
                if kind == "error":
                    errors[fold] = payload
                elif kind == "done":
                    segment, slot.segment = slot.segment, None
                    if segment.last < cfg.epochs:  # the fold's next segment may start on its worker
                        handed.add(segment.fold)
                        relay.pause(segment.fold)
                else:
                    relay.handle(kind, fold, payload)
        except (EOFError, OSError):
            return False
        return True

    try:
        while True:
            for index, queue in enumerate(queues):
                if index not in slots and queue and not stopped:  # started at once: it imports while others train
                    slots[index] = _start(cfg, shared, staging, index, run_dir, threads, devices[index % len(devices)])
                slot = slots.get(index)
                if slot is None or slot.segment is not None or slot.outbox.closed:
                    continue
                if queue and not stopped and (queue[0].first == 1 or queue[0].fold in handed):
                    _assign(slot, queue.popleft())
                elif not queue or stopped:
                    slot.outbox.close()  # nothing more for it: the worker ends
            if not slots:
                break
            wait([slot.inbox for slot in slots.values()], timeout=0.5)
            for index, slot in list(slots.items()):
                if receive(slot) and slot.proc.poll() is None:
                    continue
                slot.proc.wait()
                receive(slot)
                slot.inbox.close()
                slot.outbox.close()
                del slots[index]
                if slot.proc.returncode != 0:
                    # a slot starts only with work queued, and `_assign` sets `last`
                    stopped[(slot.last or queues[index][0]).fold] = slot.proc.returncode
    except KeyboardInterrupt:
        for slot in slots.values():  # messages not yet read say where each fold is
            receive(slot)
        raise Interrupted.during(relay.running) from None  # the workers are stopped below
    finally:
        _stop([slot.proc for slot in slots.values()])
        shutil.rmtree(staging, ignore_errors=True)
    for fold, code in sorted(stopped.items()):
        raise KaggleVitError(errors.get(fold, f"fold {fold}: its worker process stopped (exit code {code})"))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
