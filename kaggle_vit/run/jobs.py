"""Folds trained at once in a process pool on one machine (`cv --jobs N`), over its cores or GPUs.

On a small CPU, two single-threaded processes train more images per second between them than one
process with two threads (small matrices leave the second thread idle much of the time). A
`concurrent.futures.ProcessPoolExecutor` (spawn) maps `fold.train_fold` over the folds, each fold
whole, exactly as the sequential loop trains it: one process per GPU, or one per two cores, each
living for the whole run, so the imports (seconds of torch and timm) are paid once per process.

What a user must never see from a worker, and how:
- Each worker maps the images from the competition's caches itself (`SharedData`: the pages the
  parent reads, never a copy).
- Ctrl-C reaches the parent alone: the workers are started with SIGINT blocked. The parent stops
  them with SIGTERM, as it does when it gets SIGTERM itself (`timeout`, `kill`). A worker stopped
  in a fold unwinds, so atomic writes remove their temporary files; one stopped between folds or
  while Python exits ends at once (`_on_stop`).
- A worker whose parent dies (SIGKILL) stops within a fraction of a second, whatever it is doing
  (`watch_parent`), so a killed `cv` leaves no orphan training, predicting or writing into the run.
- What the workers and the pool's resource tracker would print (a parent killed while they start
  makes the pool's own code complain) goes to `workers.log` in the run's private folder, never to
  the user's terminal; a worker that dies names its fold and the log's last line.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
from .fold import train_fold
from .rundir import RunDir

STEP_EVERY = 25  # steps between progress messages from a worker
PARENT_POLL_S = 0.2  # how often a worker checks that its parent is alive
WORKERS_LOG = "workers.log"


def worker_env(device: str, environ: dict[str, str]) -> tuple[dict[str, str], str]:
    """A worker's environment and the device it names: a GPU worker sees only its GPU (as cuda),
    counted within the parent's CUDA_VISIBLE_DEVICES when that is set, so a fold runs the same
    code on whichever GPU it lands."""
    if not device.startswith("cuda"):
        return dict(environ), device
    index = int(device.partition(":")[2] or 0)
    visible = [v for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return {**environ, "CUDA_VISIBLE_DEVICES": visible[index] if visible else str(index)}, "cuda"


class QueueProgress:
    """A worker's Progress: sends fold events to the parent through the pool's event queue."""

    def __init__(self, events: "mp.Queue", fold: int = 0):
        self.events = events
        self.begin(fold)

    def begin(self, fold: int) -> None:
        """Report a new fold, counting its steps from zero."""
        self.fold, self.steps, self.images = fold, 0, 0

    def send(self, kind: str, payload) -> None:
        self.events.put((kind, self.fold, payload))

    def start_fold(self, fold: int, folds: int) -> None:
        self.send("start_fold", folds)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.send("start_epoch", (epoch, epochs, steps))

    def step(self, loss: float | None, images: int) -> None:
        self.steps, self.images = self.steps + 1, self.images + images
        if self.steps % STEP_EVERY == 0:
            self.send("step", (STEP_EVERY, self.images, loss))
            self.images = 0

    def end_epoch(self, record: dict) -> None:
        self.send("end_epoch", record)

    def end_fold(self, summary: dict) -> None:
        self.send("end_fold", summary)


class _ForwardNotices(logging.Handler):
    """A worker's notices (fold resumed, cache rebuilt) go to the parent, which prints them."""

    def __init__(self, progress: QueueProgress):
        super().__init__()
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.send("notice", record.getMessage())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Worker:
    """What a pool process holds between folds, set by `_start_worker`."""

    cfg: TrainConfig
    data: CompetitionData
    folds: np.ndarray
    run_dir: Path
    progress: QueueProgress
    in_fold: bool = False


_worker: _Worker | None = None


def _on_stop(signum, frame) -> None:
    """In a fold, unwind (atomic writes in progress remove their temporary files); between folds or
    while Python exits (where an exception would be printed), end at once: nothing is left to clean."""
    if _worker is not None and _worker.in_fold:
        raise SystemExit(128 + signum)
    os._exit(128 + signum)


def _exit_unraisable(args) -> None:
    """A stop signal's SystemExit raised where Python cannot pass it on (a weakref callback, a `__del__`)
    would be printed and ignored, and the worker would go on: it exits now, quietly."""
    if issubclass(args.exc_type, SystemExit):
        os._exit(args.exc_value.code if isinstance(args.exc_value.code, int) else 1)
    sys.__unraisablehook__(args)


def stop_quietly() -> None:
    """SIGTERM (how the parent stops a worker) or SIGINT ends this process without a word, whatever it is doing."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop)
    sys.unraisablehook = _exit_unraisable


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
    """A private folder of the run for the workers (their log, and any image array that is in
    memory only, not loaded from a cache, written once; removed when they end; those left by a
    killed cv are removed first), and the data as the workers open it."""
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

    small = [np.asarray(a) for a in (data.train.labels, data.train.ids, data.test.ids, folds)]  # sent as they are
    shared = SharedData(data.spec, data.data_dir, mapped(data.train.images, "train_images"), *small[:2],
                        mapped(data.test.images, "test_images"), *small[2:])
    return staging, shared


def _start_worker(cfg: TrainConfig, shared: SharedData, run_dir: Path, threads: int, parent: int,
                  devices: "mp.Queue", events: "mp.Queue") -> None:
    """Pool initializer: take a device, open the data, and set up signals, the parent watcher and
    the event queue that carries progress and notices to the parent."""
    global _worker
    stop_quietly()
    watch_parent(parent)
    env, device = worker_env(devices.get(), dict(os.environ))
    os.environ.update(env)  # before CUDA starts: this worker sees its GPU as cuda
    torch.set_num_threads(threads)
    data, folds = shared.open()
    progress = QueueProgress(events)
    log.addHandler(_ForwardNotices(progress))
    log.propagate = False
    _worker = _Worker(dataclasses.replace(cfg, device=device), data, folds, run_dir, progress)


def _train(fold: int) -> None:
    """Pool task: train one whole fold in this worker; an error is one line naming the fold."""
    w = _worker
    w.progress.begin(fold)
    w.in_fold = True
    try:
        train_fold(w.cfg, w.data, w.folds, fold, w.run_dir, w.progress)
    except SystemExit as stop:  # stopped by the parent: unwound, now gone before the pool's loop goes on
        os._exit(stop.code if isinstance(stop.code, int) else 1)
    except KaggleVitError:
        raise
    except Exception as error:  # noqa: BLE001 - a bug: its last line goes to the parent, which names the fold
        raise KaggleVitError(f"fold {fold}: {type(error).__name__}: {error}") from None
    finally:
        w.in_fold = False


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

    def drain(self, events: "mp.Queue") -> None:
        """Handle every event the workers have sent so far."""
        while True:
            try:
                self.handle(*events.get_nowait())
            except queue.Empty:
                return


@contextmanager
def _quiet_start(output: Path) -> Iterator[None]:
    """While the pool's processes start: SIGINT blocked, which they inherit (Ctrl-C is the parent's
    to handle), and file descriptor 2 pointed at `output`, which they inherit as their stderr."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(output, "ab") as fh:
            os.dup2(fh.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _stop(procs: list[mp.Process]) -> None:
    """Stop the pool's processes: SIGTERM, then SIGKILL for any still alive after 10 s."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f" ({lines[-1].strip()})" if lines else ""


def _error(futures: dict[cf.Future, int], staging: Path, running: dict[int, tuple[int, int]]) -> KaggleVitError | None:
    """The first failed fold's error (by fold number), or None. A worker that died (killed by the
    system, out of memory) breaks the pool: the folds then running are named, with the workers' last words."""
    failed = sorted((fold, f.exception()) for f, fold in futures.items()
                    if f.done() and not f.cancelled() and f.exception() is not None)
    if not failed:
        return None
    fold, error = failed[0]
    if isinstance(error, KaggleVitError):
        return error
    folds = " and ".join(f"fold {k}" for k in sorted(running)) or f"fold {fold}"
    return KaggleVitError(f"a worker process stopped during {folds}{_last_line(staging / WORKERS_LOG)}; "
                          f"the same command resumes")


def train_folds_parallel(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, todo: list[int], run_dir: Path,
                         jobs: int, progress, devices: list[str] | None = None) -> None:
    """Train the `todo` folds in a pool of `jobs` processes, worker i on devices[i % n] with an equal
    share of the cores; each fold whole, so its numbers do not depend on which worker trains it.
    Raises KaggleVitError naming the first failed fold (the others running finish first), and
    Interrupted (after stopping the workers) on Ctrl-C."""
    devices, jobs = devices or ["cpu"], max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    relay = FoldRelay(progress)
    staging, shared = _share(data, folds, run_dir)
    ctx = mp.get_context("spawn")
    before = set(mp.active_children())
    procs: list[mp.Process] = []
    pool = None
    try:
        with _quiet_start(staging / WORKERS_LOG):
            slots, events = ctx.Queue(), ctx.Queue()
            for i in range(jobs):
                slots.put(devices[i % len(devices)])
            pool = cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start_worker,
                                          initargs=(cfg, shared, run_dir, threads, os.getpid(), slots, events))
            futures = {pool.submit(_train, fold): fold for fold in todo}  # a spawn pool starts its processes here
            procs = [p for p in mp.active_children() if p not in before]
        error = _run(futures, events, relay, staging)
    except KeyboardInterrupt:
        if procs:
            relay.drain(events)  # events not yet read say where each fold is
        _stop(procs)
        raise Interrupted.during(relay.running) from None
    finally:
        _stop(procs)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    if error is not None:
        raise error


def _run(futures: dict[cf.Future, int], events: "mp.Queue", relay: FoldRelay, staging: Path) -> KaggleVitError | None:
    """Relay the workers' events until every fold is done; after a failure, cancel the folds not
    yet started (those running finish). Returns the first failed fold's error, or None."""
    pending = set(futures)
    while pending:
        _, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_EXCEPTION)
        relay.drain(events)
        if _error(futures, staging, relay.running) is not None:
            for future in pending:
                future.cancel()
    relay.drain(events)
    return _error(futures, staging, relay.running)
