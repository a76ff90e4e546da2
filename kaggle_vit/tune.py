"""Optuna search over a model's shape and training: a thin layer over `cv.run_cv`.

Each trial samples a TrainConfig, trains and validates `tune_folds` folds through the same code as
`kaggle-vit cv` (no test predictions, no test-time views: no trial needs them), and reports after
every epoch the running mean of the competition's metric across its folds (step = fold position ×
epochs + epoch, the same for every trial) so the pruner can stop weak trials. The study lives in a real database:
SQLite in the competition's runs folder by default, PostgreSQL (or MySQL) for many workers; a heartbeat
marks the trials of killed workers failed so the others go on.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import optuna
import sqlalchemy
from optuna.visualization import matplotlib as ovm
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from .config import TrainConfig, save_config
from .data.layouts import CompetitionData
from .errors import KaggleVitError
from .io import atomic_path, read_toml
from .metrics import Metric, get_metric
from .models.factory import MODEL_SETTINGS, check_settings, model_settings, patch_grid
from .records import EpochRecord
from .run.cv import run_cv
from .spec import CompetitionSpec
from .train.device import select_device
from .train.schedule import fold_rows, plan_schedule

HEADS = (2, 3, 4, 6, 8)


def default_space(spec: CompetitionSpec, model: str, device: str = "cpu",
                  pretrained: bool = False) -> dict[str, dict[str, Any]]:
    """Patch sizes that divide the image (4 up to a quarter of its side), depth, dropout, learning
    rate and width; narrower on a CPU, where a wide patch-4 trial would take most of an hour.
    Pretrained weights fix the architecture: then dropout and learning rate only. A model setting
    `model` has no keyword for is left out (a ResNet: dropout and learning rate)."""
    patches = [p for p in spec.patch_sizes(limit=min(spec.height, spec.width) // 4) if p >= 4] or spec.patch_sizes()
    gpu = device.startswith("cuda")
    if pretrained:
        space = {"drop_rate": {"low": 0.0, "high": 0.3}, "lr": {"low": 1e-4, "high": 3e-3, "log": True}}
    else:
        space = {
            "patch_size": {"choices": patches},
            "depth": {"low": 4, "high": 10} if gpu else {"low": 2, "high": 6},
            "drop_rate": {"low": 0.0, "high": 0.3},
            "lr": {"low": 5e-4, "high": 5e-3, "log": True},
            "embed_dim": {"choices": [96, 128, 192, 256] if gpu else [32, 48, 64, 96]},
        }
    takes = model_settings(model)
    if not patch_grid(model):  # a stem's stride (ConvNeXt's), fitted to the image: these sizes would overshrink it
        takes -= {"patch_size"}
    return {name: rule for name, rule in space.items() if name in takes or name not in MODEL_SETTINGS}


def heads_for(embed_dim: int) -> int:
    """The most heads (of 2, 3, 4, 6, 8) that divide the width with at least 16 dimensions each."""
    fitting = [h for h in HEADS if embed_dim % h == 0 and embed_dim // h >= 16]
    if not fitting:
        raise KaggleVitError(f"embed_dim {embed_dim}: no head count in {HEADS} divides it into heads of ≥ 16")
    return max(fitting)


def _suggest(trial: optuna.Trial, name: str, rule: dict[str, Any]) -> Any:
    if "choices" in rule:
        return trial.suggest_categorical(name, list(rule["choices"]))
    low, high = rule["low"], rule["high"]
    if isinstance(low, int) and isinstance(high, int) and not rule.get("log"):
        return trial.suggest_int(name, low, high)
    return trial.suggest_float(name, float(low), float(high), log=bool(rule.get("log", False)))


def sample_config(trial: optuna.Trial, base: TrainConfig, space: dict[str, dict[str, Any]],
                  patch_sizes: list[int]) -> TrainConfig:
    """The base config with this trial's choices (width picks a compatible head count)."""
    values = {name: _suggest(trial, name, rule) for name, rule in space.items()}
    if "patch_size" in values and values["patch_size"] not in patch_sizes:
        raise KaggleVitError(f"search space: patch_size {values['patch_size']} does not divide the image ({patch_sizes})")
    if "embed_dim" in values:
        values.setdefault("num_heads", heads_for(values["embed_dim"]))
    try:
        return dataclasses.replace(base, **values)
    except TypeError as error:
        raise KaggleVitError(f"search space: {error}") from None


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """median (default), hyperband, or none."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise KaggleVitError(f"--pruner must be median, hyperband or none, got '{name}'")


# Where a study can live, as a user writes the URL; for each database kaggle-vit keeps studies in,
# its name, the driver its hints name and the package that installs that driver.
STORAGES = "sqlite:///FILE, postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB"
DATABASES = {"sqlite": ("SQLite", "pysqlite", None), "postgresql": ("PostgreSQL", "psycopg", "'kaggle-vit[postgres]'"),
             "mysql": ("MySQL", "pymysql", "pymysql")}


def _shown(url: str) -> str:
    """The URL as typed, its password masked: a message is pasted into logs and issues."""
    return re.sub(r"(//[^:/@]*:).*@", r"\1***@", url)


def _reason(error: BaseException) -> str:
    """The database's own first line for a failure (its driver's message, not SQLAlchemy's wrapping)."""
    if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ is not None:
        error = error.__cause__  # Optuna's words guess at invalid data; the cause says what failed
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _driver_hint(backend: str, driver: str) -> str:
    """How to get a missing driver: the package kaggle-vit's hints name, and the URL that uses it."""
    _, usual, package = DATABASES[backend]
    steps = [f"pip install {package}"] if package else []
    if driver != usual or not steps:
        steps.append(f"write the URL as {'sqlite:///FILE' if backend == 'sqlite' else f'{backend}+{usual}://...'}")
    return " and ".join(steps)


def _sqlite_file_exists(shown: str, database: str | None) -> bool:
    """Whether the SQLite file a study is to be kept in exists; a name that can hold none is refused."""
    if not database or database == ":memory:":
        raise KaggleVitError(f"--storage {shown}: an in-memory database ends with the command, and the study "
                             f"with it; name a file: sqlite:///PATH")
    path = Path(database)
    if path.is_dir():
        raise KaggleVitError(f"--storage {shown}: {path} is a folder; name a file in it: sqlite:///{path / 'study.db'}")
    if not path.parent.is_dir():
        raise KaggleVitError(f"--storage {shown}: folder {path.parent} does not exist (tune creates the database "
                             f"file, not its folder)")
    if not path.exists() and not os.access(path.parent, os.W_OK):
        raise KaggleVitError(f"--storage {shown}: folder {path.parent} is not writable")
    return path.exists()


def check_storage(url: str) -> None:
    """Check a study database URL before anything is created, so that a bad one is one line naming
    it (password masked) and what to do: not a URL, a database kaggle-vit keeps no study in, a missing
    driver, a SQLite file in a missing folder or one that is not a database, a server that does not
    answer. A server is only asked for its table names, and a new SQLite file is not created."""
    shown = _shown(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except (ArgumentError, ValueError):
        path_like = "://" not in url and re.search(r"\.(db|sqlite3?)$", url)  # a file named where a URL goes
        raise KaggleVitError(f"--storage {shown}: not a database URL; use "
                             f"{f'sqlite:///{url}' if path_like else STORAGES}") from None
    backend = parsed.get_backend_name()
    if backend not in DATABASES:
        raise KaggleVitError(f"--storage {shown}: kaggle-vit keeps a study in SQLite, PostgreSQL or MySQL, "
                             f"not '{backend}'; use {STORAGES}")
    if "@" in (parsed.host or ""):  # the host would be the password's end, and a message would show it
        raise KaggleVitError(f"--storage {shown}: write an '@' in the password as %40")
    new_file = backend == "sqlite" and not _sqlite_file_exists(shown, parsed.database)
    try:
        engine = sqlalchemy.create_engine(url)  # connects on first use only
    except NoSuchModuleError:
        raise KaggleVitError(f"--storage {shown}: {DATABASES[backend][0]} has no driver '{parsed.get_driver_name()}'; "
                             f"{_driver_hint(backend, '')}") from None
    except ImportError:
        driver = parsed.get_driver_name()
        raise KaggleVitError(f"--storage {shown}: {DATABASES[backend][0]}'s driver {driver} is not installed; "
                             f"{_driver_hint(backend, driver)}") from None
    try:
        if not new_file:
            sqlalchemy.inspect(engine).get_table_names()
    except SQLAlchemyError as error:
        raise KaggleVitError(f"--storage {shown}: cannot open the database: {_reason(error)}") from None
    finally:
        engine.dispose()


def _rdb(url: str) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna reads braces in a URL as a template: doubled, the URL's own braces are kept
        return optuna.storages.RDBStorage(url.replace("{", "{{").replace("}", "}}"), heartbeat_interval=2,
                                          grace_period=10, engine_kwargs={"pool_pre_ping": True})


def _storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study database, its tables created; workers that start together on an empty database
    race to create them (a unique-key error for the loser), so a database error is retried."""
    try:
        for _ in range(attempts - 1):
            try:
                return _rdb(url)
            except DBAPIError:
                time.sleep(0.5 + random.random())
        return _rdb(url)
    except (SQLAlchemyError, RuntimeError) as error:  # RuntimeError: tables of another Optuna version
        raise KaggleVitError(f"--storage {_shown(url)}: cannot set up the study's tables: {_reason(error)}") from None


def open_study(storage: str, study_name: str, pruner: str, seed: int, direction: str = "maximize") -> optuna.Study:
    """Create or resume a study that optimises the competition's metric in its `direction`; its
    storage's heartbeat fails trials whose worker died."""
    rdb = _storage(storage)
    try:
        return optuna.create_study(study_name=study_name, storage=rdb, direction=direction, load_if_exists=True,
                                   sampler=optuna.samplers.TPESampler(seed=seed), pruner=make_pruner(pruner))
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        raise KaggleVitError(f"--storage {_shown(storage)}: cannot keep study '{study_name}' in it: "
                             f"{_reason(error)}") from None


@dataclass(frozen=True)
class TuneResult:
    """The study after this worker's trials, and where its outputs went."""

    study: optuna.Study
    best_config: TrainConfig | None
    best_path: Path | None
    plots: list[Path]


class FoldMeanReporter:
    """Reports a trial's running mean across its tune folds after every epoch: the best score of
    each finished fold and the best so far of the fold in progress, averaged, at a step that keeps
    growing across folds (fold position × epochs + epoch). Every trial is so compared with others
    at the same fold and epoch; raw per-fold scores would jump at each new fold."""

    def __init__(self, trial: optuna.Trial, metric: Metric):
        self.trial, self.metric = trial, metric
        self.finished: list[float] = []
        self.current: float | None = None
        self.step, self.epoch = 0, 0

    def __call__(self, record: EpochRecord) -> None:
        if record.epoch <= self.epoch and self.current is not None:  # a new fold began
            self.finished.append(self.current)
            self.current = None
        self.epoch = record.epoch
        if math.isnan(record.valid_score):  # an epoch `valid_every` leaves unvalidated: nothing to report
            return
        if self.metric.better(record.valid_score, self.current):
            self.current = record.valid_score
        self.trial.report(sum(self.finished + [self.current]) / (len(self.finished) + 1), self.step)
        self.step += 1
        if self.trial.should_prune():
            raise optuna.TrialPruned()


def objective(data: CompetitionData, base: TrainConfig, space: dict, tune_folds: list[int], trials_dir: Path,
              runs_root: Path):
    """The Optuna objective: sample, train and validate the tune folds with run_cv (no test
    predictions, no test-time views), report the running fold mean each epoch, maybe prune. Trials
    validate every epoch; best.toml keeps the base's `valid_every` for cv."""
    patch_sizes = data.spec.patch_sizes(limit=min(data.spec.height, data.spec.width))
    metric = get_metric(data.spec.metric)

    def run(trial: optuna.Trial) -> float:
        # every epoch validated, whatever the base says: the pruner judges a trial epoch by epoch
        cfg = dataclasses.replace(sample_config(trial, base, space, patch_sizes), valid_every=1)
        result = run_cv(cfg, data, trials_dir / f"trial{trial.number}", only_folds=tune_folds,
                        on_epoch=FoldMeanReporter(trial, metric), runs_root=runs_root, validate_only=True)
        scores = [f.valid_score for f in result.metrics.folds if f.fold in tune_folds]  # plain: no views in a trial
        return sum(scores) / len(scores)

    return run


def write_outputs(study: optuna.Study, base: TrainConfig, out_dir: Path) -> tuple[TrainConfig | None, Path | None, list[Path]]:
    """best.toml (reads back with `cv --config`), optimisation-history and importance PNGs."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None, None, []
    best = study.best_trial
    values = dict(best.params)
    if "embed_dim" in values:
        values.setdefault("num_heads", heads_for(values["embed_dim"]))
    cfg = dataclasses.replace(base, **values)
    best_path = save_config(cfg, out_dir / "best.toml",
                            f"best of study '{study.study_name}': trial {best.number}, value {best.value:.5f}\n"
                            f"use: kaggle-vit cv --config {out_dir / 'best.toml'}")
    plots = _plots(study, out_dir, len(complete))
    return cfg, best_path, plots


def _plots(study: optuna.Study, out_dir: Path, n_complete: int) -> list[Path]:
    plots = []
    makers = [("optimization_history.png", ovm.plot_optimization_history)]
    if n_complete >= 2:
        makers.append(("param_importances.png", ovm.plot_param_importances))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in makers:
            try:
                ax = make(study)
            except (ValueError, RuntimeError):
                continue  # e.g. importances need parameters that vary across completed trials
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            with atomic_path(out_dir / name) as tmp:
                fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            plots.append(out_dir / name)
    return plots


def check_budget(trials: int | None, timeout: float | None) -> None:
    """A study that could run no trial is a mistake, not a success."""
    if trials is not None and trials < 1:
        raise KaggleVitError(f"--trials must be at least 1, got {trials}")
    if timeout is not None and not timeout > 0:
        raise KaggleVitError(f"--timeout must be positive, got {timeout}")


def default_study_name(model: str, competition: str) -> str:
    """kvit-COMPETITION for our models (as studies have always been named), MODEL-COMPETITION for
    any other, so tuning a CNN never resumes, and mixes its trials into, a kvit study."""
    return f"kvit-{competition}" if model.startswith("kvit") else f"{model}-{competition}"


def run_tune(data: CompetitionData, base: TrainConfig, out_dir: Path, storage: str | None = None,
             study_name: str | None = None, trials: int | None = 20, timeout: float | None = None, tune_folds: int = 1,
             pruner: str = "median", space: dict | None = None) -> TuneResult:
    """Run (or resume) a study, then write best.toml and the plots into `out_dir`. Every setting is
    checked before the study or its folder is created. The base's unset schedule is planned from
    the data's rows, so every trial, and best.toml, trains to the same epochs and batch size."""
    check_budget(trials, timeout)
    if not 1 <= tune_folds <= base.folds:
        raise KaggleVitError(f"--tune-folds must be in 1..{base.folds}, got {tune_folds}")
    if base.time_budget:
        raise KaggleVitError("time_budget is for cv: tune gives each trial the base's epochs; --timeout stops "
                             "starting trials")
    base, _ = plan_schedule(base, fold_rows(len(data.train), base.folds))
    make_pruner(pruner)
    if storage:
        check_storage(storage)
    device = str(select_device(base.device))
    space = space or default_space(data.spec, base.model, device, bool(base.pretrained))
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    study_name = study_name or default_study_name(base.model, data.spec.name)
    study = open_study(storage, study_name, pruner, base.seed, get_metric(data.spec.metric).direction)
    study.set_user_attr("competition", data.spec.name)
    obj = objective(data, base, space, list(range(1, tune_folds + 1)), out_dir / "trials", out_dir.parent)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(obj, n_trials=trials, timeout=timeout, catch=(KaggleVitError,))
    cfg, best_path, plots = write_outputs(study, base, out_dir)
    return TuneResult(study, cfg, best_path, plots)


def load_space(path: Path, model: str) -> dict[str, dict[str, Any]]:
    """A search space from TOML: one table per parameter, with `choices` or `low`/`high`[/`log`];
    a model setting `model` has no keyword for is refused before any trial."""
    space = read_toml(path, "search space")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, rule in space.items():
        if name not in known:
            raise KaggleVitError(f"{path}: [{name}] is not a TrainConfig setting")
        if not isinstance(rule, dict) or not ("choices" in rule or {"low", "high"} <= set(rule)):
            raise KaggleVitError(f"{path}: [{name}] needs choices = [...] or low and high")
    check_settings(model, space, f"{path}: ")
    return space
