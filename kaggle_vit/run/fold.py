"""One fold, start to finish: build and seed its model, train it (resuming from its saved state),
then write its checkpoint, history, validation and test probabilities and, last, its result.
`cv` runs it in this process or (`cv --jobs`) in worker processes, which import only this."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..data.layouts import CompetitionData
from ..errors import KaggleVitError
from ..metrics import get_metric
from ..models.factory import create_model, model_kwargs
from ..notices import notice
from ..records import CheckpointHeader, FoldResult
from ..train import ddp
from ..train.dataset import DataConfig, ImageDataset, resolve_data_config
from ..train.device import inference_amp, select_device
from ..train.distill import Teacher
from ..train.engine import FitResult, Progress, fit, maybe_compile, predict_probs, read_state, seed_everything
from .rundir import FoldDir, RunDir
from .sources import pseudo_labels


def _resume_state(path: Path, fold: int, epochs: int, announce: bool = True) -> dict | None:
    """A fold's saved training state, saying that it resumes (unless `announce` is off: a planned
    hand-over between workers); an unreadable one restarts the fold."""
    if not path.exists():
        return None
    try:
        state = read_state(path)
    except Exception as error:  # noqa: BLE001 - a damaged state file costs the fold's epochs, not the run
        notice(f"fold {fold}: {path} is unreadable ({type(error).__name__}); restarting the fold from its first epoch")
        return None
    if announce:
        notice(f"fold {fold}: resuming after epoch {state['state']['epoch']} of {epochs}")
    return state


def _predict(model, result: FitResult, cfg: TrainConfig, valid: ImageDataset, test: ImageDataset,
             out: FoldDir) -> tuple[np.ndarray, int]:
    """The best model's validation and test probabilities under cfg's test-time views (the plain
    view of the validation rows is the best epoch's validation, not computed again); the test
    probabilities are written to the fold's folder. Returns the validation probabilities and the view count."""
    device = select_device(cfg.device)
    model.load_state_dict(result.best_state)
    predictor, amp = maybe_compile(model, cfg, device), inference_amp(cfg.amp, device)
    valid_probs = predict_probs(predictor, valid, device, amp, cfg.eval_batch_size, cfg.tta, cfg.compile,
                                cfg.tta_mode, plain=result.valid_probs)
    test_probs = predict_probs(predictor, test, device, amp, cfg.eval_batch_size, cfg.tta, cfg.compile, cfg.tta_mode)
    if ddp.is_main():
        out.write_test_probs(test_probs)
    return valid_probs, cfg.tta


def fold_teacher(cfg: TrainConfig, fold: int, data: CompetitionData, student: DataConfig) -> Teacher | None:
    """The teacher run's fold `fold` model (`cfg.teacher`), which never trained on fold `fold`'s
    validation rows, reading the student's batches; None without a teacher. A model trained for
    another image size or class count is refused in one line."""
    if not cfg.teacher:
        return None
    model = RunDir(Path(cfg.teacher)).fold(fold).read_model(data.spec)
    return Teacher(model, student, resolve_data_config(model), cfg.distill, cfg.distill_alpha, cfg.distill_temperature)


def train_fold(cfg: TrainConfig, data: CompetitionData, folds: np.ndarray, fold: int, run_dir: Path,
               progress: Progress, on_epoch=None, validate_only: bool = False,
               until_epoch: int | None = None, handover: bool = False) -> FoldResult | None:
    """Train one fold and write its checkpoint, history, validation and (unless `validate_only`, as
    a tuning trial asks) test probabilities under the test-time views, and return its result.
    With `until_epoch` below cfg.epochs it trains that far and returns None, leaving the fold's
    state for a later call (`handover`: that call is planned, so it resumes without a notice).
    Under data parallelism every rank trains and predicts its share, and rank 0 alone writes."""
    spec, out, metric = data.spec, RunDir(run_dir).fold(fold), get_metric(data.spec.metric)
    if ddp.is_main():
        out.root.mkdir(parents=True, exist_ok=True)
    state_path = out.state
    # rows of the data's arrays, never copies of their images: a fold's memory does not grow with the data
    tr, va = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    images, labels = data.train.images, data.train.labels
    train_labels, pseudo = labels[tr], np.zeros(0, dtype=np.int64)
    if cfg.pseudo:  # the source run's fold `fold` labels confident test rows; validation rows stay out
        pseudo, pseudo_y = pseudo_labels(Path(cfg.pseudo), fold, cfg.pseudo_threshold)
        train_labels = np.concatenate([train_labels, pseudo_y.astype(labels.dtype)])
    kwargs = model_kwargs(cfg, spec)
    seed_everything(cfg.seed + fold)  # the fold's initial weights do not depend on what ran before
    model = create_model(cfg, spec)  # with cfg.pretrained's weights when given
    data_config = resolve_data_config(model)  # size, mean and std the model wants (kvit: [-1, 1])
    train = ImageDataset(images, train_labels, data_config=data_config, rows=tr,
                         extra=(data.test.images, pseudo) if cfg.pseudo else None)
    valid = ImageDataset(images, labels[va], data_config=data_config, rows=va)
    progress.start_fold(fold, cfg.folds)
    try:
        result = fit(model, train, valid, cfg, seed=cfg.seed + fold,
                     state_path=state_path, resume=_resume_state(state_path, fold, cfg.epochs, not handover),
                     progress=progress, on_epoch=on_epoch, metric=metric, stop_after=until_epoch,
                     teacher=fold_teacher(cfg, fold, data, data_config))
    except KaggleVitError as error:
        raise KaggleVitError(f"fold {fold}: {error}") from None
    if len(result.history) < cfg.epochs:  # stopped at until_epoch: state.pt carries the fold on
        return None
    best = result.history[result.best_epoch - 1]
    main = ddp.is_main()
    if main:
        out.write_checkpoint(result.best_state, CheckpointHeader(
            model=cfg.model, kwargs=kwargs, fold=fold, competition=spec.name,
            input_size=(spec.channels, spec.height, spec.width), num_classes=spec.num_classes,
            class_names=tuple(spec.class_names), valid_acc=best.valid_acc))
    t0 = time.perf_counter()
    if validate_only:  # a tuning trial: its score is the best epoch's plain validation; no test set, no views
        probs_views, views = result.valid_probs.astype(np.float32), 1
    else:
        test = ImageDataset(data.test.images, data_config=data_config)
        probs_views, views = _predict(model, result, cfg, valid, test, out)
    if main:
        out.write_valid_probs(va, result.valid_probs.astype(np.float32), probs_views)
        out.write_history(result.history)
    summary = FoldResult(
        fold=fold, best_epoch=result.best_epoch, epochs=len(result.history), metric=metric.name,
        valid_loss=best.valid_loss, valid_acc=best.valid_acc, valid_score=best.valid_score,
        valid_acc_views=float((probs_views.argmax(1) == labels[va]).mean()),
        valid_score_views=metric(labels[va], probs_views), tta=views,
        train_seconds=result.train_seconds, predict_seconds=time.perf_counter() - t0,
        images_per_s=float(np.median([r.images_per_s for r in result.history])),
        amp=result.amp, device=str(select_device(cfg.device)), pseudo_rows=len(pseudo))
    if main:
        out.write_result(summary)
        state_path.unlink(missing_ok=True)
    ddp.barrier()  # no rank moves on (to the OOF, another fold) before the fold's files are there
    progress.end_fold(summary)
    return summary
