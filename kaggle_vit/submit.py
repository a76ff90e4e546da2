"""Fold ensemble → submission.csv, validated before it is written; scoring against a solution file."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .blend import FITTERS, BlendFit, fit_blend
from .config import checked_settings, load_toml
from .data.layouts import SPEC_PATHS, CompetitionData
from .data.tables import load_sample_ids, read_csv
from .errors import KaggleVitError
from .io import atomic_path
from .metrics import clip_probs, get_metric, one_hot
from .records import FoldResult
from .run.rundir import RunDir, runs_of
from .spec import CompetitionSpec, shown


@dataclass(frozen=True)
class Submission:
    """What `make_submission` wrote and from which fold models: (run folder, fold) pairs, each
    with its weight (a fitted blend: its run's weight shared by the run's folds), and the fit."""

    path: Path
    members: list[tuple[Path, int]]
    weights: list[float]
    class_counts: dict[int, int]
    probs: np.ndarray
    blend: BlendFit | None = None  # --weighting fit

    @property
    def folds(self) -> list[int]:
        """The fold numbers taken (from every run, when several were averaged)."""
        return sorted({k for _, k in self.members})


def latest_run(spec: CompetitionSpec, runs_root: Path = Path("runs")) -> Path:
    """The most recently updated run of a competition that has at least one finished fold."""
    runs = runs_of(runs_root / spec.name)
    if not runs:
        raise KaggleVitError(f"{runs_root / spec.name}: no runs yet; run kaggle-vit cv first")
    return max(runs, key=lambda p: RunDir(p).metrics.stat().st_mtime)


def submission_runs(spec: CompetitionSpec, given: list[Path] | None, runs_root: Path = Path("runs")) -> list[Path]:
    """The runs to average: those given, or else the latest run, with the other seeds of its
    `cv --seeds` call when it was one (its metrics.json lists them)."""
    if given:
        return list(given)
    latest = latest_run(spec, runs_root)
    seeds = RunDir(latest).read_metrics().seed_ensemble
    group = [Path(p) for p in seeds.runs] if seeds is not None else []
    return group if group and all(p.is_dir() for p in group) else [latest]


def run_folds(run_dir: Path) -> tuple[int, dict[int, FoldResult]]:
    """Fold count of a run and the results of its finished folds."""
    run = RunDir(run_dir)
    n_folds = run.read_metrics().n_folds
    return n_folds, {k: run.fold(k).read_result() for k in run.finished_folds(n_folds)}


def choose_folds(run_dir: Path, wanted: list[int] | None, allow_missing: bool) -> dict[int, FoldResult]:
    """The finished folds to ensemble; a missing one is an error unless `allow_missing`."""
    n_folds, done = run_folds(run_dir)
    wanted = wanted or list(range(1, n_folds + 1))
    missing = [k for k in wanted if k not in done]
    if missing and not allow_missing:
        raise KaggleVitError(f"{run_dir}: fold(s) {missing} not finished; finish them with kaggle-vit cv, "
                             f"choose --fold, or pass --allow-missing to use fewer")
    chosen = {k: done[k] for k in wanted if k in done}
    if not chosen:
        raise KaggleVitError(f"{run_dir}: no finished folds among {wanted}")
    return chosen


def fold_test_probs(run_dir: Path, fold: int, data: CompetitionData, tta: int | None = None,
                    device: str = "auto") -> np.ndarray:
    """A fold model's test probabilities: as cv saved them (with the run's test-time views), or,
    when `tta` is given (or none were saved, or for another test set), recomputed. A damaged file is
    one line: it is never silently replaced by a new prediction."""
    files = RunDir(run_dir).fold(fold)
    if tta is None and files.test_probs.exists():
        probs = files.read_test_probs()
        if probs.shape == (len(data.test), data.spec.num_classes):
            return probs
    # lazy: only here are torch, the model and the training code needed: a submission from saved
    # probabilities imports none of them (torch, timm and albumentations take seconds to import).
    from .train.dataset import ImageDataset, resolve_data_config
    from .train.device import inference_amp, select_device
    from .train.engine import predict_probs

    model, dev = files.read_model(data.spec), select_device(device)
    model.to(dev)
    config = RunDir(run_dir).config
    saved = checked_settings({k: v for k, v in load_toml(config).items() if k in ("tta", "tta_mode")}, str(config))
    views = tta if tta is not None else saved.get("tta", 1)
    test = ImageDataset(data.test.images, data_config=resolve_data_config(model))
    return predict_probs(model, test, dev, inference_amp("auto", dev), views=views, mode=saved.get("tta_mode", "shift"))


def _check_ids(ids: np.ndarray, expected_ids: list[str], id_col: str, source: str) -> None:
    """Ids unique, the sample's, in its order, compared as the text Kaggle reads."""
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        r = int(np.argmax(dup))
        raise KaggleVitError(f"{source}: row {r + 1}, column '{id_col}': duplicate id {ids[r]}")
    expected = np.asarray([str(i) for i in expected_ids])
    if len(ids) != len(expected):
        absent = sorted(set(expected.tolist()) - set(ids.tolist()))[:1]
        what = f"; id {absent[0]} is missing" if absent else ""
        raise KaggleVitError(f"{source}: {len(ids)} rows, expected {len(expected)}{what}")
    mismatch = ids != expected
    if mismatch.any():
        r = int(np.argmax(mismatch))
        raise KaggleVitError(f"{source}: row {r + 1}, column '{id_col}': id {ids[r]}, expected {expected[r]}")


def _class_indices(frame: pd.DataFrame, column: str, classes: tuple[str, ...], source: str) -> np.ndarray:
    """A label column's class indices; every label must be one of the class labels, compared as the
    text Kaggle reads (`9`, not `Ankle boot`, when the competition's files hold class numbers)."""
    labels = frame[column].astype(str).to_numpy()
    index = {label: i for i, label in enumerate(classes)}
    unknown = [r for r, label in enumerate(labels) if label not in index]
    if unknown:
        r = unknown[0]
        raise KaggleVitError(f"{source}: row {r + 1}, column '{column}': label '{labels[r]}' is not one of the "
                             f"{len(classes)} classes ({shown(classes)})")
    return np.asarray([index[label] for label in labels], dtype=np.int64)


def _probabilities(frame: pd.DataFrame, columns: list[str], source: str) -> np.ndarray:
    """Probability columns as an (N, len(columns)) array; each value must be a number from 0 to 1."""
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~((values >= 0) & (values <= 1))  # also NaN: text that is not a number
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise KaggleVitError(f"{source}: row {r + 1}, column '{columns[c]}': '{frame[columns[c]].iloc[r]}' is not a "
                             f"probability (a number from 0 to 1)")
    return values


def validate_submission(frame: pd.DataFrame, spec: CompetitionSpec, expected_ids: list[str], source: str) -> np.ndarray:
    """Check a submission in the spec's form, as the text Kaggle reads: its columns, row count, ids
    (unique, the sample's, in its order) and values (class labels, or probabilities from 0 to 1);
    return it as (N, classes) probabilities (a label is a certain class)."""
    header = spec.submission_header()
    if list(frame.columns) != header:
        raise KaggleVitError(f"{source}: row 0: columns {list(frame.columns)}, expected {header}")
    _check_ids(frame[header[0]].astype(str).to_numpy(), expected_ids, header[0], source)
    if spec.submission_form == "label":
        return one_hot(_class_indices(frame, header[1], spec.class_labels, source), len(spec.class_labels))
    probs = _probabilities(frame, header[1:], source)
    return np.concatenate([1 - probs, probs], axis=1) if spec.submission_form == "probability" else probs


def submission_frame(ids: np.ndarray, probs: np.ndarray, spec: CompetitionSpec) -> pd.DataFrame:
    """The submission of ensemble probabilities in the spec's form: the most probable class's label,
    the second class's probability, or every class's; probabilities clipped as Kaggle's log loss clips them."""
    header = spec.submission_header()
    if spec.submission_form == "label":
        return pd.DataFrame({header[0]: ids, header[1]: np.asarray(spec.class_labels, dtype=object)[probs.argmax(1)]})
    clipped = clip_probs(probs)
    if spec.submission_form == "probability":
        return pd.DataFrame({header[0]: ids, header[1]: clipped[:, 1]})
    return pd.concat([pd.DataFrame({header[0]: ids}), pd.DataFrame(clipped, columns=header[1:])], axis=1)


def expected_ids(data: CompetitionData) -> list[str]:
    """The test ids a submission must list, in the sample submission's order."""
    spec = data.spec
    if spec.layout == "pixels":
        return [str(i) for i in load_sample_ids(data.data_dir / spec.sample_submission_file, spec)]
    return [str(i) for i in data.test.ids]  # read from the sample submission when the data was loaded


def _kind(path: Path) -> str | None:
    """What a path is, when it is not a regular file (or nothing)."""
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        return "a folder"
    return "a device or other special file" if path.exists() and not path.is_file() else None


def check_output(output: Path, spec: CompetitionSpec, data_dir: Path, force: bool = False) -> None:
    """Refuse, before any work, a submission written where nobody asked: over an existing file
    (unless `force`), over the competition's own files or into its image folders (even with
    `force`), as anything but a regular file, or into a missing folder outside the working
    directory (one inside it is created)."""
    output = Path(output)
    kind = _kind(output)
    if kind:
        raise KaggleVitError(f"{output}: {kind}; a submission is written only as a regular file: choose another --output")
    real = output.resolve()
    if any(real.is_relative_to((data_dir / getattr(spec, field)).resolve()) for field, _ in SPEC_PATHS):
        raise KaggleVitError(f"{output}: one of the competition's own files in {data_dir}, never written over; "
                             f"choose another --output")
    if output.exists() and not force:
        raise KaggleVitError(f"{output}: already exists; pass --force to replace it, or choose another --output")
    parent, cwd = real.parent, Path.cwd().resolve()
    if not parent.exists() and not parent.is_relative_to(cwd):
        raise KaggleVitError(f"{output.parent}: no such folder, and kaggle-vit creates folders only inside the "
                             f"working directory ({cwd}); create it first or choose another --output")


def _shared_folds(by_run: dict[Path, dict[int, FoldResult]]) -> list[int]:
    """The folds every run blends (at least two, for the nested check); refused unless the same."""
    first, folds = next(iter(by_run.items()))
    for run, chosen in by_run.items():
        if list(chosen) != list(folds):
            raise KaggleVitError(f"{run}: folds {list(chosen)}, but {first}: folds {list(folds)}; --weighting fit "
                                 f"blends runs on the same folds' OOF rows")
    if len(folds) < 2:
        raise KaggleVitError(f"--weighting fit: folds {list(folds)}; its nested check needs at least 2")
    return list(folds)


def _oof_members(runs: list[Path], folds: list[int], n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs' OOF probabilities (with their test-time views, the predictor they submit) on the
    rows of `folds`, as (runs, rows, classes), those training rows, and each row's fold; refused
    unless every run validated the same rows in each fold (same fold count and seed)."""
    read = [RunDir(run).read_oof(folds) for run in runs]
    rows, fold_of_row = read[0][:2]
    for run, (other_rows, other_folds, _, _) in zip(runs, read):
        if not (np.array_equal(other_rows, rows) and np.array_equal(other_folds, fold_of_row)):
            raise KaggleVitError(f"{run}: folds {folds} validated other rows than {runs[0]}'s; --weighting fit "
                                 f"blends runs of the same folds (same --folds and seed)")
    if rows.max() >= n_rows:
        raise KaggleVitError(f"{runs[0]}: OOF row {rows.max()} beyond the {n_rows:,} training rows; blend runs of "
                             f"this competition's data")
    return np.stack([views for *_, views in read]).astype(np.float64), rows, fold_of_row


def _fitted(by_run: dict[Path, dict[int, FoldResult]], data: CompetitionData, method: str, tta: int | None,
            device: str) -> tuple[BlendFit, np.ndarray]:
    """A blend of the runs (each the mean of its folds) fitted on their OOF rows, and its test probabilities."""
    runs, folds = list(by_run), _shared_folds(by_run)
    members, rows, fold_of_row = _oof_members(runs, folds, len(data.train))
    fit, blend = fit_blend(members, data.train.labels[rows], fold_of_row, get_metric(data.spec.metric), method)
    tests = np.stack([np.mean([fold_test_probs(run, k, data, tta, device) for k in folds], axis=0) for run in runs])
    return fit, blend(tests)


def make_submission(run_dirs: Path | list[Path], data: CompetitionData, output: Path, folds: list[int] | None = None,
                    weighting: str = "mean", tta: int | None = None, allow_missing: bool = False,
                    device: str = "auto", force: bool = False, blend: str | None = None) -> Submission:
    """Average the chosen folds' test probabilities, of one run or of several (seeds, models), each
    fold model weighted equally or (`oof`) by its validation accuracy under the run's test-time
    views, the predictor whose test probabilities it averages; or (`fit`) blend the runs, each the
    mean of its folds, by weights fitted on their OOF probabilities (`blend`: hill or stack); and
    write the submission (`force`: over an existing file; see `check_output`)."""
    spec = data.spec
    check_output(output, spec, data.data_dir, force)
    if weighting not in ("mean", "oof", "fit"):
        raise KaggleVitError(f"--weighting must be mean, oof or fit, got '{weighting}'")
    if blend is not None and weighting != "fit":
        raise KaggleVitError(f"--blend {blend} chooses how --weighting fit fits; add --weighting fit")
    if (blend or "hill") not in FITTERS:
        raise KaggleVitError(f"--blend must be {' or '.join(FITTERS)}, got '{blend}'")
    runs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    by_run = {Path(run): choose_folds(Path(run), folds, allow_missing) for run in runs}
    chosen = {(run, k): result for run, done in by_run.items() for k, result in done.items()}
    for run, k in chosen:
        RunDir(run).fold(k).read_checkpoint(spec)  # refuses mismatched image sizes or class counts before any work
    fit = None
    if weighting == "fit":
        fit, probs = _fitted(by_run, data, blend or "hill", tta, device)
        weights = np.array([w / len(by_run[run]) for run, w in zip(by_run, fit.weights) for _ in by_run[run]])
    else:
        raw = np.array([chosen[m].valid_acc_views if weighting == "oof" else 1.0 for m in chosen], dtype=np.float64)
        weights = raw / raw.sum()
        probs = sum(w * fold_test_probs(run, k, data, tta, device) for w, (run, k) in zip(weights, chosen))
    labels = probs.argmax(1)
    frame = submission_frame(data.test.ids, probs, spec)
    validate_submission(frame, spec, expected_ids(data), str(output))
    with atomic_path(output) as tmp:
        frame.to_csv(tmp, index=False)
    counts = dict(sorted(Counter(labels.tolist()).items()))
    return Submission(output, list(chosen), weights.tolist(), counts, probs, fit)


def read_submission(path: Path, spec: CompetitionSpec, ids: list[str]) -> np.ndarray:
    """Read and validate a submission file; return it as (N, classes) probabilities in id order."""
    return validate_submission(read_csv(Path(path), text=True), spec, ids, str(path))


def read_solution(solution: Path, spec: CompetitionSpec) -> tuple[list[str], np.ndarray]:
    """A solution file's ids and true class indices (its columns: `spec.solution_columns`)."""
    truth = read_csv(Path(solution), text=True)
    id_col, label_col = spec.solution_columns
    if list(truth.columns[:2]) != [id_col, label_col]:
        raise KaggleVitError(f"{solution}: row 0: columns {list(truth.columns)}, expected {[id_col, label_col]}")
    return truth[id_col].tolist(), _class_indices(truth, label_col, spec.class_labels, str(solution))


def score_submission(submission: Path, solution: Path, spec: CompetitionSpec) -> float:
    """The competition's metric of a submission against a solution file (a metric of probabilities
    scores submitted labels as certain)."""
    ids, truth = read_solution(solution, spec)
    return get_metric(spec.metric)(truth, read_submission(submission, spec, ids))


def fold_scores(run_dir: Path, data: CompetitionData, solution: Path, folds: list[int]) -> dict[int, float]:
    """The competition's metric of each single fold model on the held-out rows (from its saved test probabilities)."""
    _, truth = read_solution(solution, data.spec)
    if len(truth) != len(data.test):
        raise KaggleVitError(f"{solution}: {len(truth):,} rows, but {data.data_dir / data.spec.test_file} has "
                             f"{len(data.test):,}; give the --data-dir whose test file this solution scores")
    metric = get_metric(data.spec.metric)
    return {k: metric(truth, fold_test_probs(run_dir, k, data)) for k in folds}
