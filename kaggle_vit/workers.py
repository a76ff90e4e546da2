"""Folds trained at once in worker processes on one machine (`cv --jobs N`).

On a small CPU, two single-threaded processes train more images per second between them than one
process with two threads (1.24-1.36x measured on the 2-core CPU: small matrices leave the second
thread idle much of the time). Each worker runs `cv.train_fold` for one fold, exactly as the
sequential loop does, and reports to the parent through a queue; a worker whose parent dies stops
at its next step, so a killed `cv` leaves no orphan writing into the run folder.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import CompetitionData
from .errors import KaggleVitError

STEP_EVERY = 25  # steps between progress messages from a worker


def auto_jobs(cfg: TrainConfig, device: torch.device, folds_to_run: int) -> int:
    """How many folds to train at once: `cfg.jobs` when set; else 2 on a CPU with 2+ cores, 1 on a GPU."""
    if cfg.jobs > 0:
        return min(cfg.jobs, max(1, folds_to_run))
    cores = os.cpu_count() or 1
    return 2 if device.type == "cpu" and cores >= 2 and folds_to_run > 1 else 1


class QueueProgress:
    """A worker's Progress: sends fold events to the parent; exits if the parent is gone."""

    def __init__(self, events: mp.Queue, fold: int, parent: int):
        self.events, self.fold, self.parent = events, fold, parent
        self.steps, self.images, self.loss = 0, 0, 0.0

    def _alive(self) -> None:
        if os.getppid() != self.parent:
            os._exit(1)  # the parent was killed: stop before writing anything more

    def start_fold(self, fold: int, folds: int) -> None:
        self.events.put(("start_fold", self.fold, folds))

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._alive()
        self.events.put(("start_epoch", self.fold, (epoch, epochs, steps)))

    def step(self, loss: float, images: int) -> None:
        self.steps, self.images, self.loss = self.steps + 1, self.images + images, loss
        if self.steps % STEP_EVERY == 0:
            self._alive()
            self.events.put(("step", self.fold, (STEP_EVERY, self.images, loss)))
            self.images = 0

    def end_epoch(self, record: dict) -> None:
        self.events.put(("end_epoch", self.fold, record))

    def end_fold(self, summary: dict) -> None:
        self.events.put(("end_fold", self.fold, summary))


def _worker(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, fold: int, run_dir: Path, threads: int,
            events: mp.Queue, parent: int) -> None:
    """Process entry point: train one fold with `threads` intra-op threads."""
    from .cv import train_fold

    torch.set_num_threads(threads)
    try:
        train_fold(cfg, data, folds, fold, run_dir, QueueProgress(events, fold, parent))
    except KaggleVitError as exc:
        events.put(("error", fold, str(exc)))
        raise SystemExit(1) from None
    except BaseException:
        events.put(("error", fold, traceback.format_exc(limit=4)))
        raise SystemExit(1) from None


class FoldRelay:
    """Turns worker events back into calls on the user's Progress: the live display follows one
    fold at a time (the next running one when it ends); every fold's end is passed on."""

    def __init__(self, progress):
        self.progress, self.shown, self.n_folds = progress, None, 0

    def handle(self, kind: str, fold: int, payload) -> None:
        if kind == "start_fold":
            self.n_folds = payload
        elif kind == "start_epoch" and self.shown is None:
            self.shown = fold
            self.progress.start_fold(fold, self.n_folds)
        if kind == "end_fold":
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


def train_folds_parallel(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, todo: list[int], run_dir: Path,
                         jobs: int, progress) -> None:
    """Train the `todo` folds in batches of `jobs`, each fold in its own process with an equal share
    of the cores (a last, smaller batch gets more threads each). Batches rather than a queue keep
    each fold's thread count, and so its numbers, independent of timing: folds take equal time,
    so little is lost waiting. Raises KaggleVitError naming the fold if a worker fails."""
    ctx = mp.get_context("spawn")  # fork is unsafe once torch's thread pools exist
    events: mp.Queue = ctx.Queue()
    cores, pending, running = os.cpu_count() or 1, list(todo), {}
    relay, errors, stopped = FoldRelay(progress), {}, {}

    def drain(timeout: float) -> None:
        try:
            kind, fold, payload = events.get(timeout=timeout) if timeout > 0 else events.get_nowait()
            while True:
                if kind == "error":
                    errors[fold] = payload.strip().splitlines()[-1]
                else:
                    relay.handle(kind, fold, payload)
                kind, fold, payload = events.get_nowait()
        except queue.Empty:
            pass

    while pending or running:
        if not running and pending and not stopped:  # the next batch of up to `jobs` folds
            batch, pending = pending[:jobs], pending[jobs:]
            threads = max(1, cores // len(batch))
            for fold in batch:
                proc = ctx.Process(target=_worker, args=(cfg, data, folds, fold, run_dir, threads, events, os.getpid()),
                                   daemon=True)
                proc.start()
                running[fold] = proc
        drain(0.5)
        for fold, proc in list(running.items()):
            if not proc.is_alive():
                proc.join()
                del running[fold]
                if proc.exitcode != 0:
                    stopped[fold], pending = proc.exitcode, []
    drain(0.0)
    for fold, code in stopped.items():
        raise KaggleVitError(f"fold {fold}: {errors.get(fold, f'its worker process stopped (exit code {code})')}")
