"""Progress displays: training (a rich live bar, or one plain line per fold for notebooks and CI),
and a bar for long loops such as decoding image files."""
from __future__ import annotations

import time
from typing import Iterator, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.progress import track as rich_track

from .records import EpochRecord, FoldResult

T = TypeVar("T")


def track(items: Sequence[T], description: str, at_least: int = 500) -> Iterator[T]:
    """Iterate over `items` with a transient progress bar on stderr when it is a terminal and the
    loop is long; silently otherwise (logs get no bar)."""
    console = Console(stderr=True)
    if not console.is_terminal or len(items) < at_least:
        yield from items
        return
    yield from rich_track(items, description=description, console=console, transient=True)


def fold_line(summary: FoldResult) -> str:
    """One finished fold in a line: its accuracy (with the test-time views), best epoch and training time."""
    return (f"fold {summary.fold}: valid acc {100 * summary.valid_acc_views:.2f}% (epoch {summary.best_epoch}), "
            f"{summary.train_seconds:.0f}s")


class RichProgress:
    """Fold, epoch, loss, accuracy, images/s and time left, live in the terminal."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.bar = Progress(
            TextColumn("[bold]fold {task.fields[fold]}/{task.fields[folds]}[/] epoch {task.fields[epoch]}"),
            BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val acc {task.fields[acc]}  {task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.task = None
        self.fold, self.folds = 0, 0
        self.t0, self.images, self.last_acc, self.last_loss = 0.0, 0, "-", 0.0

    def start_fold(self, fold: int, folds: int) -> None:
        self.fold, self.folds, self.last_acc = fold, folds, "-"
        self.bar.start()

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.t0, self.images = time.perf_counter(), 0
        self.task = self.bar.add_task("", total=steps, fold=self.fold, folds=self.folds,
                                      epoch=f"{epoch}/{epochs}", loss=self.last_loss, acc=self.last_acc, ips=0.0)

    def step(self, loss: float | None, images: int) -> None:
        self.images += images
        ips = self.images / max(1e-9, time.perf_counter() - self.t0)
        self.bar.update(self.task, advance=1, ips=ips, **({} if loss is None else {"loss": loss}))

    def end_epoch(self, record: EpochRecord) -> None:
        self.last_loss = record.train_loss
        valid = "not validated"  # an epoch `valid_every` leaves out
        if record.validated:
            self.last_acc = f"{100 * record.valid_acc:.2f}%"
            valid = f"valid loss {record.valid_loss:.4f} acc {self.last_acc}"
        self.console.print(
            f"fold {self.fold} epoch {record.epoch}: train loss {record.train_loss:.4f} "
            f"acc {100 * record.train_acc:.2f}% | {valid} | {record.images_per_s:.0f} img/s, {record.seconds:.1f}s",
            highlight=False,
        )

    def end_fold(self, summary: FoldResult) -> None:
        if summary.fold != self.fold:  # a fold that trained beside the one shown (cv --jobs)
            self.console.print(fold_line(summary), highlight=False)
            return
        if self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None
        self.bar.stop()


class LineProgress:
    """Quiet mode: one line per finished fold, nothing live."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()

    def start_fold(self, fold: int, folds: int) -> None: ...
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float | None, images: int) -> None: ...
    def end_epoch(self, record: EpochRecord) -> None: ...

    def end_fold(self, summary: FoldResult) -> None:
        self.console.print(fold_line(summary), highlight=False)
