"""Which process trains which fold, when several `cv` processes, on one machine or many, share one
run folder on a shared file system (docs/distributed.md).

A process trains a fold only while it holds the fold's claim (foldK/claim.json: machine, process,
when it started, its last heartbeat), created only where none exists. A thread refreshes the
heartbeats of the claims a process holds; a claim goes when its fold finishes or its process stops
(an error, Ctrl-C, SIGTERM). A claim left by a process that died is stale, and taken over with one
line: on its own machine as soon as its process is gone, from another machine once its heartbeat
is older than CLAIM_TIMEOUT_S. Claims are read and written under the run folder's lock
(`RunDir.locked`), so two processes never take the same fold.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

from ..errors import KaggleVitError
from ..io import HOST, is_running
from ..notices import notice
from ..records import FoldClaim
from .rundir import RunDir

HEARTBEAT_S = 60.0  # how often a process refreshes its claims' heartbeats
# A claim whose heartbeat is older than this is stale. Ten heartbeats, so that neither machines'
# clocks a little apart (NTP keeps them within a second), nor a file server's attribute cache (NFS:
# up to a minute), nor a process paused a while (a busy file server, a swapping machine) makes a
# live claim look dead; a fold whose machine died is trained by another within about ten minutes.
CLAIM_TIMEOUT_S = 600.0


def finished(run_dir: Path, fold: int) -> bool:
    """Whether a fold is done: result.json written and every file of it readable. A fold with a
    damaged or missing file is marked unfinished (its result.json removed) so it trains again."""
    files = RunDir(run_dir).fold(fold)
    if not files.result.exists():
        return False
    problem = files.problem()
    if problem:
        notice(f"fold {fold}: {problem}; training the fold again")
        files.result.unlink()
        return False
    return True


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M", time.localtime(seconds))


def _stale(claim: FoldClaim) -> str | None:
    """Why another process's claim is stale ('HOST:PID, which claimed it at 11:02, has stopped'), or
    None while its process may still be training the fold. A claim of this machine naming this
    process's own pid was left by an earlier process that had the same pid."""
    who = f"{claim.host}:{claim.pid}"
    if claim.host == HOST and (claim.pid == os.getpid() or not is_running(claim.pid)):
        return f"{who}, which claimed it at {_clock(claim.started)}, has stopped"
    if time.time() - claim.heartbeat > CLAIM_TIMEOUT_S:
        return f"{who} has sent no heartbeat since {_clock(claim.heartbeat)}"
    return None


class FoldClaims:
    """The folds this process trains of a run folder others may share: each claimed before it
    trains, its claim kept alive by a heartbeat thread and given up when the fold finishes; every
    claim still held is given up when the `with` block ends, however it ends."""

    def __init__(self, run: RunDir):
        self.run = run
        self.held: dict[int, FoldClaim] = {}
        self.taken: list[int] = []  # the folds claimed, in order: those this process trained
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._heartbeats, name="kaggle-vit-heartbeat", daemon=True)

    def __enter__(self) -> FoldClaims:
        self._beats.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._beats.join()
        with self.run.locked():
            for fold in list(self.held):
                self._give_up(fold)

    def take(self, fold: int) -> bool:
        """Claim `fold` for this process; False, with one line, when another process finished it
        meanwhile or holds a live claim on it. A stale claim is taken over, with one line."""
        files = self.run.fold(fold)
        with self.run.locked():
            if finished(self.run.root, fold):
                notice(f"fold {fold}: finished by another process; skipped")
                return False
            claim, problem = files.read_claim()
            why = problem or (claim and _stale(claim))
            if claim is not None and not why:
                notice(f"fold {fold}: being trained by {claim.host}:{claim.pid} since {_clock(claim.started)}; "
                       f"skipped")
                return False
            if why:
                notice(f"fold {fold}: {why}; taking the fold over")
                files.claim.unlink()
            now = time.time()
            mine = FoldClaim(HOST, os.getpid(), now, now)
            if not files.create_claim(mine):  # only where the lock does not reach every machine
                notice(f"fold {fold}: claimed by another process meanwhile; skipped")
                return False
            self.held[fold] = mine
            self.taken.append(fold)
            return True

    def release(self, fold: int) -> None:
        """Give up the claim on `fold`: it is finished."""
        with self.run.locked():
            self._give_up(fold)

    def _give_up(self, fold: int) -> None:
        """Remove this process's claim on `fold`, unless another process has taken it over."""
        mine = self.held.pop(fold, None)
        files = self.run.fold(fold)
        claim, _ = files.read_claim()
        if mine is not None and claim is not None and (claim.host, claim.pid) == (mine.host, mine.pid):
            files.claim.unlink()

    def _heartbeats(self) -> None:
        """Refresh the held claims' heartbeats every HEARTBEAT_S until the `with` block ends."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self.run.locked():
                    for fold, mine in list(self.held.items()):
                        self._beat(fold, mine)
            except (OSError, KaggleVitError):
                continue  # a file server that did not answer this time: the next heartbeat tries again

    def _beat(self, fold: int, mine: FoldClaim) -> None:
        files = self.run.fold(fold)
        claim, _ = files.read_claim()
        if claim is None or (claim.host, claim.pid) != (mine.host, mine.pid):
            notice(f"fold {fold}: another process took it over (this one's heartbeat came too late); both may "
                   f"train it")
            del self.held[fold]
            return
        self.held[fold] = dataclasses.replace(mine, heartbeat=time.time())
        files.write_claim(self.held[fold])
