"""Folds trained at once in worker processes on one machine (`cv --jobs N`).

On a small CPU, two single-threaded processes train more images per second between them than one
process with two threads (small matrices leave the second thread idle much of the time). Each
worker runs `cv.train_fold` for one fold, exactly as the sequential loop does, and reports to the
parent through its own pipe.

What a user must never see from a worker: the images are handed over as memory-mapped files (so
the pickle each worker reads at start is a few kilobytes, written at once, and a parent killed
while workers start cannot leave one reading half of it); workers ignore Ctrl-C, which the parent
handles by stopping them with SIGTERM (so temporary files are cleaned and no traceback printed);
no semaphores are created (pipes, not queues), so none can leak; and a worker whose parent dies
stops at its next step, so a killed `cv` leaves no orphan writing into the run folder.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import CompetitionData, ImageTable
from .errors import Interrupted, KaggleVitError
from .io import atomic_path
from .notices import log, notice

STEP_EVERY = 25  # steps between progress messages from a worker


def auto_jobs(cfg: TrainConfig, device: torch.device, folds_to_run: int) -> int:
    """How many folds to train at once: `cfg.jobs` when set; else 2 on a CPU with 2+ cores, 1 on a GPU."""
    if cfg.jobs > 0:
        return min(cfg.jobs, max(1, folds_to_run))
    cores = os.cpu_count() or 1
    return 2 if device.type == "cpu" and cores >= 2 and folds_to_run > 1 else 1


class PipeProgress:
    """A worker's Progress: sends fold events to the parent; exits if the parent is gone."""

    def __init__(self, conn: Connection, fold: int, parent: int):
        self.conn, self.fold, self.parent = conn, fold, parent
        self.steps, self.images, self.loss = 0, 0, 0.0

    def _alive(self) -> None:
        if os.getppid() != self.parent:
            os._exit(1)  # the parent was killed: stop before writing anything more

    def send(self, kind: str, payload) -> None:
        try:
            self.conn.send((kind, self.fold, payload))
        except OSError:  # the pipe broke: the parent is gone, and nobody is left to tell
            os._exit(1)

    def start_fold(self, fold: int, folds: int) -> None:
        self.send("start_fold", folds)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._alive()
        self.send("start_epoch", (epoch, epochs, steps))

    def step(self, loss: float, images: int) -> None:
        self.steps, self.images, self.loss = self.steps + 1, self.images + images, loss
        if self.steps % STEP_EVERY == 0:
            self._alive()
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


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds, so atomic writes in progress remove their temp files


# Arrays handed to workers as .npy files, memory-mapped copy-on-write there (writable, so torch
# takes them without a warning).
ARRAYS = ("train_images", "train_labels", "train_ids", "test_images", "test_ids", "folds")


def _stage_arrays(data: CompetitionData, folds: np.ndarray, run_dir: Path) -> Path:
    """Write the data for the workers into a private folder of the run (removed when they end)."""
    for stale in run_dir.glob(".arrays-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".arrays-{os.getpid()}-", dir=run_dir))
    arrays = (data.train.images, data.train.labels, data.train.ids, data.test.images, data.test.ids, folds)
    for name, array in zip(ARRAYS, arrays):
        with atomic_path(staging / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    return staging


def _load_arrays(staging: Path, data: CompetitionData) -> tuple[CompetitionData, np.ndarray]:
    a = {name: np.load(staging / f"{name}.npy", mmap_mode="c") for name in ARRAYS}
    train = ImageTable(a["train_images"], np.asarray(a["train_labels"]), np.asarray(a["train_ids"]))
    test = ImageTable(a["test_images"], None, np.asarray(a["test_ids"]))
    return CompetitionData(data.spec, data.data_dir, train, test), np.asarray(a["folds"])


def _worker(cfg: TrainConfig, data: CompetitionData, staging: Path, fold: int, run_dir: Path, threads: int,
            conn: Connection, parent: int) -> None:
    """Process entry point: train one fold with `threads` intra-op threads. `data` comes without
    its arrays, which are read from `staging`."""
    from .cv import train_fold

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    torch.set_num_threads(threads)
    progress = PipeProgress(conn, fold, parent)
    log.addHandler(_ForwardNotices(progress))
    log.propagate = False
    try:
        data, folds = _load_arrays(staging, data)
        train_fold(cfg, data, folds, fold, run_dir, progress)
    except KaggleVitError as exc:
        progress.send("error", str(exc))
        sys.exit(1)
    except Exception:  # noqa: BLE001 - a bug: its last line goes to the parent, which names the fold
        last = traceback.format_exc(limit=4).strip().splitlines()[-1]
        progress.send("error", f"fold {fold}: {last}")
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


def _start(ctx, cfg: TrainConfig, data: CompetitionData, staging: Path, fold: int, run_dir: Path,
           threads: int) -> tuple[mp.Process, Connection]:
    """Start one fold's worker with Ctrl-C ignored (inherited through exec): the parent handles it."""
    receive, send = ctx.Pipe(duplex=False)
    bare = CompetitionData(data.spec, data.data_dir, *(ImageTable(t.images[:0], None, t.ids[:0]) for t in (data.train, data.test)))
    proc = ctx.Process(target=_worker, args=(cfg, bare, staging, fold, run_dir, threads, send, os.getpid()), daemon=True)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    send.close()
    return proc, receive


def _stop(procs: list[mp.Process]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def train_folds_parallel(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, todo: list[int], run_dir: Path,
                         jobs: int, progress) -> None:
    """Train the `todo` folds in batches of `jobs`, each fold in its own process with an equal share
    of the cores (a last, smaller batch gets more threads each). Batches rather than a queue keep
    each fold's thread count, and so its numbers, independent of timing: folds take equal time,
    so little is lost waiting. Raises KaggleVitError naming the fold if a worker fails, and
    Interrupted (after stopping the workers) on Ctrl-C."""
    ctx = mp.get_context("spawn")  # fork is unsafe once torch's thread pools exist
    cores, pending = os.cpu_count() or 1, list(todo)
    running: dict[int, tuple[mp.Process, Connection]] = {}
    relay, errors, stopped = FoldRelay(progress), {}, {}
    staging = _stage_arrays(data, folds, run_dir)

    def receive(conn: Connection) -> bool:
        """Handle every message waiting on `conn`; False once the worker has closed it."""
        try:
            while conn.poll():
                kind, fold, payload = conn.recv()
                if kind == "error":
                    errors[fold] = payload
                else:
                    relay.handle(kind, fold, payload)
        except (EOFError, OSError):
            return False
        return True

    try:
        while pending or running:
            if not running and pending and not stopped:  # the next batch of up to `jobs` folds
                batch, pending = pending[:jobs], pending[jobs:]
                threads = max(1, cores // len(batch))
                for fold in batch:
                    running[fold] = _start(ctx, cfg, data, staging, fold, run_dir, threads)
            wait([conn for _, conn in running.values()], timeout=0.5)
            for fold, (proc, conn) in list(running.items()):
                open_ = receive(conn)
                if not open_ or not proc.is_alive():
                    proc.join()
                    receive(conn)
                    conn.close()
                    del running[fold]
                    if proc.exitcode != 0:
                        stopped[fold], pending = proc.exitcode, []
    except KeyboardInterrupt:
        _stop([proc for proc, _ in running.values()])
        raise Interrupted.during(relay.running) from None
    finally:
        _stop([proc for proc, _ in running.values()])
        shutil.rmtree(staging, ignore_errors=True)
    for fold, code in stopped.items():
        raise KaggleVitError(errors.get(fold, f"fold {fold}: its worker process stopped (exit code {code})"))
