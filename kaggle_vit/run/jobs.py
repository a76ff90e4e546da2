"""Folds trained at once in a process pool on one machine (`cv --jobs N`), over its cores or GPUs.

On a small CPU, two single-threaded processes train more images per second between them than one
process with two threads (small matrices leave the second thread idle much of the time). A
`concurrent.futures.ProcessPoolExecutor` (spawn) maps `fold.train_fold` over the folds' segments:
one process per GPU, or one per two cores, each living for the whole run, so the imports (seconds
of torch and timm) are paid once per process. `plan_segments` shares the work out in equal parts,
cutting a fold between two processes at an epoch boundary where five folds would otherwise leave
one process idle at the end; the cut fold passes on through its state file, the same exact resume
that survives a kill, so every fold's numbers are those of the sequential loop.

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
  the user's terminal; a worker that dies names the folds then training and the log's last line.
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
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
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
from .claims import FoldClaims
from .fold import train_fold
from .sources import pseudo_labels
from .rundir import RunDir

STEP_EVERY = 25  # steps between progress messages from a worker
PARENT_POLL_S = 0.2  # how often a worker checks that its parent is alive
WORKERS_LOG = "workers.log"


class Segment(NamedTuple):
    """Epochs `first`..`last` of one fold, trained by one process; the segment that reaches the
    fold's last epoch also predicts with the best model."""

    fold: int
    first: int
    last: int


def plan_segments(todo: list[int], epochs: int, jobs: int, epoch_cost: float | Sequence[float] = 1.0,
                  predict_cost: float = 1.0) -> list[list[Segment]]:
    """Spread the folds over `jobs` processes so that each gets an equal share of the work, cutting
    at most one fold per process at an epoch boundary (McNaughton's wrap-around rule): folds are laid
    end to end, each with its last epochs and prediction first, and cut at every multiple of the
    share, moved to the nearest epoch boundary. A cut fold's tail closes one process's list and its
    head opens the next one's, so the head runs first. Costs are relative: an epoch's (one for
    all, or one per epoch when epochs differ, as with `skip_easy`) and a fold's final prediction's.
    Cuts are placed from absolute positions, so rounding never piles up on the last process."""
    costs = _epoch_costs(epoch_cost, epochs)
    fold_cost = sum(costs) + predict_cost
    share = len(todo) * fold_cost / jobs
    # offsets inside a fold where a process may stop: before it, after a tail of t = 1..epochs-1
    # epochs and the prediction, or after all of it
    stops = [0.0] + [predict_cost + sum(costs[epochs - t:]) for t in range(1, epochs)] + [fold_cost]
    cuts: dict[int, int] = {}  # fold index -> epochs of its tail left to the process before the cut
    for w in range(1, jobs):
        index = min(int(w * share // fold_cost), len(todo) - 1)
        offset = w * share - index * fold_cost
        tail = min(range(len(stops)), key=lambda t: abs(stops[t] - offset))
        if tail == epochs:  # after the whole fold: the next fold opens the next process
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


def _epoch_costs(epoch_cost: float | Sequence[float], epochs: int) -> list[float]:
    return [float(epoch_cost)] * epochs if isinstance(epoch_cost, (int, float)) else [float(c) for c in epoch_cost]


def dispatch_order(plans: list[list[Segment]], epoch_cost: float | Sequence[float] = 1.0,
                   predict_cost: float = 1.0) -> list[Segment]:
    """The plan's segments in the order of their planned start: handed to the pool's processes in
    this order, each to the first one free, they run as `plan_segments` laid them out."""
    epochs = max(segment.last for plan in plans for segment in plan)
    costs = _epoch_costs(epoch_cost, epochs)
    starts = []
    for worker, plan in enumerate(plans):
        clock = 0.0
        for segment in plan:
            starts.append((clock, worker, segment))
            clock += sum(costs[segment.first - 1:segment.last]) + (predict_cost if segment.last == epochs else 0.0)
    return [segment for _, _, segment in sorted(starts)]


# A training image costs about this many inference passes (forward, backward, optimiser), as
# measured in cv on a CPU (benchmarks/RESULTS.md, "Folds in parallel").
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


def _train(segment: Segment) -> None:
    """Pool task: train one segment of a fold in this worker (a later segment takes the fold on from
    its state file, silently: a planned hand-over is no resume to report); an error is one line
    naming the fold."""
    w = _worker
    w.progress.begin(segment.fold)
    w.in_fold = True
    try:
        train_fold(w.cfg, w.data, w.folds, segment.fold, w.run_dir, w.progress, until_epoch=segment.last,
                   handover=segment.first > 1)
    except SystemExit as stop:  # stopped by the parent: unwound, now gone before the pool's loop goes on
        os._exit(stop.code if isinstance(stop.code, int) else 1)
    except KaggleVitError:
        raise
    except Exception as error:  # noqa: BLE001 - a bug: its last line goes to the parent, which names the fold
        raise KaggleVitError(f"fold {segment.fold}: {type(error).__name__}: {error}") from None
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

    def pause(self, fold: int) -> None:
        """A fold's first segment ended: it leaves the display until a process takes it on."""
        self.running.pop(fold, None)
        self.shown = None if fold == self.shown else self.shown

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


def _error(futures: dict[cf.Future, Segment], staging: Path, running: dict[int, tuple[int, int]]) -> KaggleVitError | None:
    """The first failed fold's error (by fold number), or None. A worker that died (killed by the
    system, out of memory) breaks the pool: the folds then training are named, with the workers' last words."""
    failed = sorted((segment.fold, f.exception()) for f, segment in futures.items()
                    if f.done() and not f.cancelled() and f.exception() is not None)
    if not failed:
        return None
    fold, error = failed[0]
    if isinstance(error, KaggleVitError):
        return error
    folds = " and ".join(f"fold {k}" for k in sorted(running)) or f"fold {fold}"
    return KaggleVitError(f"a worker process stopped during {folds}{_last_line(staging / WORKERS_LOG)}; "
                          f"the same command resumes")


class _Dispatch:
    """Hands the segments to the pool in `dispatch_order`, one per free process (so each goes to the
    first process free), a fold's later segment only once its earlier one has ended. A fold's first
    segment is handed out only once this process has claimed the fold: one that another process
    sharing the run folder trains or finished is left out."""

    def __init__(self, order: list[Segment], jobs: int, epochs: int, claims: FoldClaims):
        self.order, self.jobs, self.epochs, self.claims = deque(order), jobs, epochs, claims
        self.pool: cf.ProcessPoolExecutor | None = None
        self.futures: dict[cf.Future, Segment] = {}
        self.running: set[cf.Future] = set()
        self.handed: set[int] = set()  # folds whose first segment has ended

    def pick(self) -> Segment | None:
        """The next segment ready to run (its fold claimed), taken out of the order; None when none is."""
        while True:
            segment = next((s for s in self.order if s.first == 1 or s.fold in self.handed), None)
            if segment is None or segment.first > 1 or self.claims.take(segment.fold):
                if segment is not None:
                    self.order.remove(segment)
                return segment
            self.order = deque(s for s in self.order if s.fold != segment.fold)

    def ready(self, n: int) -> list[Segment]:
        """Up to `n` segments ready to run, their folds claimed, taken out of the order."""
        picked: list[Segment] = []
        while len(picked) < n and (segment := self.pick()) is not None:
            picked.append(segment)
        return picked

    def start(self, pool: cf.ProcessPoolExecutor, first: list[Segment]) -> None:
        """Submit the first segments, picked before the pool's processes start (a spawn pool starts
        them at its first submit), so that what claiming them says reaches the terminal."""
        self.pool = pool
        for segment in first:
            self._submit(segment)

    def fill(self) -> None:
        """Submit ready segments while a process is free."""
        for segment in self.ready(self.jobs - len(self.running)):
            self._submit(segment)

    def _submit(self, segment: Segment) -> None:
        future = self.pool.submit(_train, segment)
        self.futures[future] = segment
        self.running.add(future)

    def wait(self) -> list[Segment]:
        """Wait a moment for segments to end, giving up the claims of folds finished; returns the
        first segments of folds that ended, now handed on."""
        done, self.running = cf.wait(self.running, timeout=0.2, return_when=cf.FIRST_COMPLETED)
        ok = [self.futures[f] for f in done if f.exception() is None]
        for segment in ok:
            if segment.last == self.epochs:
                self.claims.release(segment.fold)
        ended = [segment for segment in ok if segment.last < self.epochs]
        self.handed.update(segment.fold for segment in ended)
        return ended


def train_folds_parallel(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, todo: list[int], run_dir: Path,
                         jobs: int, progress, devices: list[str], claims: FoldClaims) -> None:
    """Train the `todo` folds in a pool of `jobs` processes, as `plan_segments` shares them out (a
    fold cut between two processes moves through its state file), worker i on devices[i % n] with an
    equal share of the cores, each fold once `claims` has claimed it (another process sharing the
    run folder may train some). The plan and the thread counts, and so every fold's numbers, do not
    depend on timing. Raises KaggleVitError naming the first failed fold (the segments running
    finish first), and Interrupted (after stopping the workers) on Ctrl-C."""
    jobs = max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    costs = plan_costs(data, folds, cfg)
    dispatch = _Dispatch(dispatch_order(plan_segments(todo, cfg.epochs, jobs, *costs), *costs), jobs, cfg.epochs,
                         claims)
    first = dispatch.ready(jobs)
    if not first:  # every fold is trained, or was finished, by other processes sharing the run folder
        return
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
            dispatch.start(pool, first)  # the first segment of each process: a spawn pool starts its processes here
            procs = [p for p in mp.active_children() if p not in before]
        error = _run(dispatch, events, relay, staging)
    except KeyboardInterrupt:
        if procs:
            relay.drain(events)  # events not yet read say where each fold is
        raise Interrupted.during(relay.running) from None  # the workers are stopped below
    finally:
        _stop(procs)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    if error is not None:
        raise error


def _run(dispatch: _Dispatch, events: "mp.Queue", relay: FoldRelay, staging: Path) -> KaggleVitError | None:
    """Relay the workers' events and hand out segments until all have ended; after a failure, hand
    out no more (those running finish). Returns the first failed fold's error, or None."""
    while dispatch.running:
        for segment in dispatch.wait():
            relay.pause(segment.fold)
        relay.drain(events)
        if _error(dispatch.futures, staging, relay.running) is None:
            dispatch.fill()
    relay.drain(events)
    return _error(dispatch.futures, staging, relay.running)
