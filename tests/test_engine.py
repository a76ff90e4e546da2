import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kaggle_vit.config import TrainConfig
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.train import device as device_module
from kaggle_vit.train.augment import shift, tta_shifts
from kaggle_vit.train.dataset import DataConfig, ImageDataset
from kaggle_vit.train.device import Amp, amp_for
from kaggle_vit.train.engine import (NoProgress, fit, make_optimizer, make_scheduler, make_trainer, maybe_compile,
                                     predict_logits, predict_probs, read_state, train_one_epoch, validates)

TINY = TrainConfig(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, epochs=2, batch_size=32,
                   lr=2e-3, aug="rotate", num_workers=0, device="cpu")


def _model(cfg=TINY):
    from kaggle_vit.models.factory import create_model
    from kaggle_vit.spec import load_spec

    torch.manual_seed(0)
    return create_model(cfg, load_spec("digit-recognizer"))


def test_one_step_lowers_the_loss(small_comp, small_spec):
    d = load_competition(small_spec, small_comp)
    x, y = DataConfig((1, 28, 28)).prepare(torch.from_numpy(d.train.images[:64])), torch.as_tensor(d.train.labels[:64])
    model = _model()
    opt = make_optimizer(model, TINY)
    model.train()
    before = F.cross_entropy(model(x), y)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    assert after.item() < before.item()


def test_schedule_warms_up_then_decays():
    model = torch.nn.Linear(2, 2)
    cfg = dataclasses.replace(TINY, epochs=2, warmup_epochs=0.5)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[4] == max(lrs) and lrs[-1] < 0.05 * cfg.lr
    assert amp_for("auto", torch.device("cpu")).name == "off"


def test_a_shorter_epoch_keeps_its_place_in_the_schedule():
    """An epoch trained on fewer rows (skip_easy) ends where a full epoch ends in the schedule, and with
    equal epochs the schedule's position is the step itself."""
    from kaggle_vit.train.engine import WarmupCosine

    cfg = dataclasses.replace(TINY, epochs=3, warmup_epochs=0.5)
    full, short = WarmupCosine(3, 0.5, 10), WarmupCosine(3, 0.5, 10)
    short.begin_epoch(2, start_step=10, steps=4)
    assert [short(10 + k) for k in range(5)] == [full(10 + k * 2.5) for k in range(5)]
    short.begin_epoch(3, start_step=14, steps=10)
    assert short(24) == full(30) < 1e-9 and full(4) == 1.0
    sched = make_scheduler(make_optimizer(torch.nn.Linear(2, 2), cfg), cfg, steps_per_epoch=10)
    sched.lr_lambdas[0].begin_epoch(2, start_step=0, steps=4)
    restored = make_scheduler(make_optimizer(torch.nn.Linear(2, 2), cfg), cfg, steps_per_epoch=10)
    restored.load_state_dict(sched.state_dict())
    assert restored.lr_lambdas[0].__dict__ == sched.lr_lambdas[0].__dict__


def test_skip_easy_trains_middle_epochs_on_fewer_rows_and_resumes_exactly(small_comp, small_spec, tmp_path):
    d = load_competition(small_spec, small_comp)
    train, valid = ImageDataset(d.train.images[:480], d.train.labels[:480]), ImageDataset(d.train.images[480:], d.train.labels[480:])
    cfg = dataclasses.replace(TINY, epochs=4, skip_easy=0.7)
    straight = fit(_model(cfg), train, valid, cfg, seed=1)
    images = [r.images for r in straight.history]
    assert images[0] == images[-1] == 480 and all(n < 480 for n in images[1:-1])  # first and last epochs see every row
    state = tmp_path / "state.pt"
    fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, stop_after=2)
    assert read_state(state)["row_loss"].shape == (480,)
    resumed = fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, resume=read_state(state))
    assert [r.images for r in resumed.history] == images
    assert resumed.history[-1].valid_loss == straight.history[-1].valid_loss


def test_valid_every_validates_only_its_epochs_and_the_last_and_keeps_a_validated_best(small_comp, small_spec, tmp_path):
    d = load_competition(small_spec, small_comp)
    train, valid = ImageDataset(d.train.images[:480], d.train.labels[:480]), ImageDataset(d.train.images[480:], d.train.labels[480:])
    every = fit(_model(), train, valid, dataclasses.replace(TINY, epochs=5), seed=1)
    cfg = dataclasses.replace(TINY, epochs=5, valid_every=2)
    sparse = fit(_model(cfg), train, valid, cfg, seed=1)
    validated = [r.epoch for r in sparse.history if not np.isnan(r.valid_acc)]
    assert validated == [2, 4, 5] and sparse.best_epoch in validated
    # the same training: the validated epochs score as when every epoch is validated
    assert [r.valid_loss for r in sparse.history if r.epoch in validated] == [
        r.valid_loss for r in every.history if r.epoch in validated]
    scores = {e: every.history[e - 1].valid_score for e in validated}
    assert sparse.best_epoch == max(validated, key=lambda e: (scores[e], -e))  # the first of the best
    last = dataclasses.replace(cfg, valid_every=0)
    assert [e for e in range(1, 6) if validates(e, last)] == [5]
    state = tmp_path / "state.pt"  # a fold handed over after an unvalidated epoch still finds its best
    fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, stop_after=3)
    resumed = fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, resume=read_state(state))
    assert resumed.best_epoch == sparse.best_epoch and np.array_equal(resumed.valid_probs, sparse.valid_probs)


def test_fit_is_repeatable_and_resumes_exactly(small_comp, small_spec, tmp_path):
    d = load_competition(small_spec, small_comp)
    train, valid = ImageDataset(d.train.images[:480], d.train.labels[:480]), ImageDataset(d.train.images[480:], d.train.labels[480:])
    straight = fit(_model(), train, valid, TINY, seed=1)
    again = fit(_model(), train, valid, TINY, seed=1)
    assert straight.history[-1].valid_loss == again.history[-1].valid_loss
    # Interrupt after epoch 1 (its state is saved, as a kill would find it), then run again.
    state = tmp_path / "state.pt"

    def stop(record):
        raise KeyboardInterrupt

    try:
        fit(_model(), train, valid, TINY, seed=1, state_path=state, on_epoch=stop)
    except KeyboardInterrupt:
        pass
    assert state.exists()
    trained_epochs = []
    resumed = fit(_model(), train, valid, TINY, seed=1, state_path=state, resume=read_state(state),
                  on_epoch=lambda record: trained_epochs.append(record.epoch))
    assert trained_epochs == [2] and [r.epoch for r in resumed.history] == [1, 2]  # epoch 1 came from the state
    assert resumed.history[-1].valid_loss == straight.history[-1].valid_loss
    assert len(straight.history) == 2 and straight.best_state is not None
    assert straight.valid_probs.shape == (120, 10) and np.allclose(straight.valid_probs.sum(1), 1, atol=1e-5)


def test_ema_weights_are_the_ones_validated_kept_and_resumed(small_comp, small_spec, tmp_path):
    """With `ema`, the kept weights are the moving average (not the last step's), a resumed fold
    continues the same average, and its validation scores are those of the average."""
    d = load_competition(small_spec, small_comp)
    train, valid = ImageDataset(d.train.images[:480], d.train.labels[:480]), ImageDataset(d.train.images[480:], d.train.labels[480:])
    cfg = dataclasses.replace(TINY, ema=0.9)
    model = _model(cfg)
    averaged = fit(model, train, valid, cfg, seed=1)
    raw = {k: v.detach() for k, v in model.state_dict().items()}
    assert any(not torch.equal(averaged.best_state[k], raw[k]) for k in raw if raw[k].is_floating_point())
    scored = _model(cfg)
    scored.load_state_dict(averaged.best_state)
    logits = predict_logits(scored.eval(), valid, torch.device("cpu"), amp_for("off", torch.device("cpu")))
    assert (logits.argmax(1) == valid.labels).float().mean().item() == averaged.history[averaged.best_epoch - 1].valid_acc
    state = tmp_path / "state.pt"

    def stop(record):
        raise KeyboardInterrupt

    try:
        fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, on_epoch=stop)
    except KeyboardInterrupt:
        pass
    assert read_state(state)["ema"] is not None
    resumed = fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, resume=read_state(state))
    assert resumed.history[-1].valid_loss == averaged.history[-1].valid_loss


def test_shift_moves_the_image_and_repeats_the_border():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    right = shift(x, 1, 0)[0, 0]
    assert torch.equal(right[:, 1:], x[0, 0, :, :3]) and torch.equal(right[:, 0], x[0, 0, :, 0])
    up = shift(x, 0, -1)[0, 0]
    assert torch.equal(up[:3], x[0, 0, 1:]) and torch.equal(up[3], x[0, 0, 3])
    assert tta_shifts(5) == [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]


def test_predict_probs_averages_the_shifted_views(small_comp, small_spec):
    images = load_competition(small_spec, small_comp).train.images[:70]
    dataset = ImageDataset(images)
    model, cpu, off = _model().eval(), torch.device("cpu"), amp_for("off", torch.device("cpu"))
    plain = predict_probs(model, dataset, cpu, off, batch_size=32)
    assert np.allclose(plain, predict_logits(model, dataset, cpu, off, 32).softmax(1).numpy(), atol=1e-6)
    x = DataConfig((1, 28, 28)).prepare(torch.from_numpy(images))
    with torch.no_grad():
        by_hand = sum(model(shift(x, dx, dy)).softmax(1) for dx, dy in tta_shifts(3)) / 3
    three = predict_probs(model, dataset, cpu, off, batch_size=32, views=3)
    assert np.allclose(three, by_hand.numpy(), atol=1e-5) and not np.allclose(three, plain, atol=1e-3)
    # A padded last batch (what a compiled model is given) changes no prediction.
    assert np.allclose(predict_probs(model, dataset, cpu, off, batch_size=32, views=3, pad=True), three, atol=1e-6)
    # The plain view given (a fold's validation) is used as is, in its rows' places, and not computed again.
    given = predict_probs(model, dataset, cpu, off, batch_size=32, views=3, plain=plain)
    assert np.array_equal(given, three)
    marked = plain.copy()
    marked[40] = np.eye(10, dtype=np.float32)[3]  # a row the model does not put in class 3 with certainty
    moved = predict_probs(model, dataset, cpu, off, batch_size=32, views=3, plain=marked)
    assert np.allclose(moved[40], (three[40] * 3 - plain[40] + marked[40]) / 3, atol=1e-6)
    assert np.array_equal(np.delete(moved, 40, 0), np.delete(three, 40, 0))


def test_amp_policy_uses_fp16_with_a_scaler_where_there_is_no_bf16(monkeypatch):
    cuda = torch.device("cuda")
    assert (amp_for("auto", cuda, bf16_supported=False).name, amp_for("auto", cuda, bf16_supported=False).scaler) == ("fp16", True)
    assert (amp_for("auto", cuda, bf16_supported=True).name, amp_for("auto", cuda, bf16_supported=True).scaler) == ("bf16", False)
    # A T4 (7.5): torch.cuda.is_bf16_supported() says yes there (bf16 emulated, slowly); the policy asks the capability.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert amp_for("auto", cuda).name == "fp16" and amp_for("auto", cuda).scaler and amp_for("fp16", cuda).scaler
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # an H100
    assert (amp_for("auto", cuda).name, amp_for("auto", cuda).scaler) == ("bf16", False)
    assert amp_for("bf16", cuda).name == "bf16" and amp_for("auto", torch.device("cpu")).name == "off"


def test_the_fp16_step_skips_overflowing_steps_and_backs_off_then_trains(small_comp, small_spec):
    """The T4/P100 step (fp16 autocast, GradScaler), run on the CPU's autocast and scaler: at a loss scale
    whose gradients overflow fp16, steps leave the weights alone and halve the scale; at 2^16 they train."""
    d = load_competition(small_spec, small_comp)
    batch = [(DataConfig((1, 28, 28)).prepare(torch.from_numpy(d.train.images[:64])), torch.as_tensor(d.train.labels[:64]), None)]
    cfg = dataclasses.replace(TINY, amp="fp16", warmup_epochs=0, epochs=1)

    def run(init_scale: float, steps: int) -> tuple[list[float], list[float], list[float]]:
        model = _model(cfg)
        t = dataclasses.replace(make_trainer(model, cfg, steps_per_epoch=steps), amp=Amp(torch.float16, True),
                                scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
        losses, scales, moved = [], [], []
        for _ in range(steps):
            before = [p.detach().clone() for p in model.parameters()]
            losses.append(train_one_epoch(t, batch, 1, NoProgress())["train_loss"])
            scales.append(t.scaler.get_scale())
            moved.append(max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)))
        return losses, scales, moved

    losses, scales, moved = run(2.0**30, 3)
    assert moved == [0.0, 0.0, 0.0] and scales == [2.0**29, 2.0**28, 2.0**27] and len(set(losses)) == 1
    losses, scales, moved = run(2.0**16, 4)
    assert min(moved) > 0 and scales == [2.0**16] * 4 and losses[-1] < losses[0]


def test_compile_is_skipped_with_one_notice_on_a_gpu_triton_cannot_compile_for(monkeypatch, caplog):
    """A Kaggle P100 (capability 6.0) would fail at the first compiled step: it runs eager, and says so."""
    model, cfg, cuda = torch.nn.Linear(2, 2), dataclasses.replace(TrainConfig(), compile=True), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (6, 0))
    device_module._notice_eager.cache_clear()
    with caplog.at_level("WARNING", logger="kaggle_vit"):
        assert maybe_compile(model, cfg, cuda) is model and maybe_compile(model, cfg, cuda) is model
    assert [r.getMessage() for r in caplog.records] == [
        "compile skipped: Tesla P100-PCIE-16GB has CUDA capability 6.0, and torch.compile (Triton) needs 7.0 "
        "or newer; the model runs eager"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))  # a T4
    assert isinstance(maybe_compile(model, cfg, cuda), torch._dynamo.eval_frame.OptimizedModule)
    assert maybe_compile(model, dataclasses.replace(cfg, compile=False), cuda) is model


def test_attention_weights_stay_finite_where_fp16_scores_overflow():
    """q·k of 256-wide heads with values near 40 exceeds fp16's 65,504: computed in fp16 the softmax
    gives NaN; the explicit attention path computes it in float32."""
    from kaggle_vit.models.vit import Attention

    attn = Attention(dim=256, num_heads=1).half()
    x = torch.full((1, 5, 256), 40.0, dtype=torch.float16)
    with torch.no_grad():
        attn.qkv.weight.fill_(0.02)
        attn.qkv.bias.zero_()
        q, k, _ = attn.qkv(x).view(1, 5, 3, 1, 256).permute(2, 0, 3, 1, 4).unbind(0)
        assert torch.isnan((q @ k.transpose(-2, -1)).softmax(-1)).any()  # what fp16 scores would give
        out, weights = attn(x, return_attention=True)
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    assert torch.allclose(weights.sum(-1), torch.ones(1)) and out.dtype == torch.float16 and torch.isfinite(out).all()


def test_skip_easy_outside_zero_to_one_is_refused_in_one_line(small_comp, tmp_path):
    from typer.testing import CliRunner

    from kaggle_vit.cli import app

    result = CliRunner().invoke(app, ["cv", "--data-dir", str(small_comp), "--run-dir", str(tmp_path / "r"), "--set", "skip_easy=1"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: skip_easy is a share of rows in [0, 1) (0: off), got 1.0"], result.output
    assert not (tmp_path / "r").exists()


def test_valid_every_below_zero_is_refused_in_one_line(small_comp, tmp_path):
    from typer.testing import CliRunner

    from kaggle_vit.cli import app

    result = CliRunner().invoke(app, ["cv", "--data-dir", str(small_comp), "--run-dir", str(tmp_path / "r"), "--set", "valid_every=-1"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "error: valid_every is a number of epochs (0: validate after the last only), got -1"], result.output
    assert not (tmp_path / "r").exists()


def _lr_of(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    """Each parameter's learning rate in the optimiser, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}


def test_layer_decay_groups_follow_timms_depths_and_keep_their_ratios_through_the_schedule():
    """With layer_decay, the head learns at lr, block i of `depth` at lr * decay^(depth - i), the
    final norm with the last block, and the conv stem with the patch embedding and tokens at the
    bottom; as timm's own groups say, for a kvit and a timm ViT. The schedule keeps the ratios."""
    import timm
    from timm.optim import param_groups_layer_decay

    cfg = dataclasses.replace(TINY, layer_decay=0.5, lr=1e-3, weight_decay=0.05)
    kvit = _model(cfg)  # kvit_pico_patch7_28: a conv stem before the patch embedding
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=3,
                            embed_dim=32, num_heads=2)
    for model, depth in ((kvit, 2), (vit, 3)):
        opt = make_optimizer(model, cfg)
        lr = _lr_of(opt, model)
        expected = {"head.weight": 1e-3, "norm.weight": 1e-3 * 0.5, "cls_token": 1e-3 * 0.5 ** (depth + 1),
                    "pos_embed": 1e-3 * 0.5 ** (depth + 1)}
        expected |= {f"blocks.{i}.attn.qkv.weight": 1e-3 * 0.5 ** (depth - i) for i in range(depth)}
        expected |= {n: 1e-3 * 0.5 ** (depth + 1) for n in lr if n.startswith(("stem.", "patch_embed."))}
        assert {n: lr[n] for n in expected} == pytest.approx(expected)
        timms = param_groups_layer_decay(model, 0.05, model.no_weight_decay(), layer_decay=0.5)
        assert [([id(p) for p in g["params"]], g["weight_decay"], g["lr"]) for g in opt.param_groups] == [
            ([id(p) for p in g["params"]], g["weight_decay"], 1e-3 * g["lr_scale"]) for g in timms]
        decayed = {n for n, p in model.named_parameters() for g in opt.param_groups
                   if g["weight_decay"] and any(p is q for q in g["params"])}
        assert "head.weight" in decayed and not decayed & {"cls_token", "pos_embed", "head.bias", "norm.weight"}
        sched = make_scheduler(opt, cfg, steps_per_epoch=10)
        for _ in range(3):
            opt.step()
            sched.step()
        stepped = _lr_of(opt, model)
        assert 0 < stepped["head.weight"] != 1e-3
        assert {n: stepped[n] / stepped["head.weight"] for n in lr} == pytest.approx({n: lr[n] / 1e-3 for n in lr})


def test_layer_decay_is_refused_in_one_line_for_a_model_timm_cannot_group():
    from kaggle_vit.errors import KaggleVitError

    with pytest.raises(KaggleVitError, match="^layer_decay: timm cannot group my_net's parameters by depth"):
        make_optimizer(torch.nn.Linear(4, 2), dataclasses.replace(TINY, model="my_net", layer_decay=0.75))


@pytest.mark.parametrize("alphas", [dict(mixup=0.8), dict(cutmix=1.0), dict(mixup=0.8, cutmix=1.0)])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_and_cutmix_batches_carry_soft_targets_that_sum_to_one(alphas, mode):
    """Mixed rows' targets are class probabilities (summing to 1, smoothed, two labels sharing a
    row); an odd batch's last row, which Mixup cannot pair, keeps its own image and label."""
    from kaggle_vit.train.engine import make_mixup, mix

    np.random.seed(0)
    cfg = dataclasses.replace(TINY, label_smoothing=0.1, mixup_mode=mode, **alphas)
    x, y = torch.rand(9, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])
    original = x.clone()
    target = mix(make_mixup(cfg, num_classes=10), x, y)
    assert target.shape == (9, 10) and torch.allclose(target.sum(1), torch.ones(9))
    assert (target >= 0.01 - 1e-6).all()  # label smoothing's share of 0.1 spread over the 10 classes
    pairs = target[:8].topk(2).indices.sort(1).values  # row i is mixed with row 7 - i, its mirror in the batch
    assert pairs.tolist() == [sorted([i, 7 - i]) for i in range(8)] and (target[:8, :].max(1).values < 0.91).all()
    assert not torch.equal(x[:8], original[:8]) and torch.equal(x[8], original[8])
    assert target[8].argmax() == 8 and target[8].max() == pytest.approx(0.91)


@pytest.mark.parametrize("where", ["off", "on"])
def test_mixup_trains_on_either_batch_source_validates_on_the_true_labels_and_resumes_exactly(small_comp, small_spec,
                                                                                              where, tmp_path):
    """Mixup and cutmix on the host path (odd batches) or the device path train on mixed images (the
    loss differs from the same epoch unmixed); validation scores the true labels; a fold stopped
    after an epoch resumes to the same result (Mixup draws from NumPy's generator, which the state keeps)."""
    d = load_competition(small_spec, small_comp)
    train, valid = ImageDataset(d.train.images[:480], d.train.labels[:480]), ImageDataset(d.train.images[480:], d.train.labels[480:])
    plain = dataclasses.replace(TINY, batch_size=31, aug="none", data_on_device=where)
    cfg = dataclasses.replace(plain, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mixed, unmixed = fit(_model(cfg), train, valid, cfg, seed=1), fit(_model(plain), train, valid, plain, seed=1)
    assert np.isfinite(mixed.history[0].train_loss) and mixed.history[0].train_loss != unmixed.history[0].train_loss
    record, labels = mixed.history[mixed.best_epoch - 1], valid.labels.numpy()
    assert record.valid_acc == pytest.approx((mixed.valid_probs.argmax(1) == labels).mean())
    assert record.valid_loss == pytest.approx(-np.log(mixed.valid_probs[np.arange(len(labels)), labels]).mean(), rel=1e-4)
    state = tmp_path / "state.pt"
    fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, stop_after=1)
    resumed = fit(_model(cfg), train, valid, cfg, seed=1, state_path=state, resume=read_state(state))
    assert [r.valid_loss for r in resumed.history] == [r.valid_loss for r in mixed.history]


def test_mixup_with_skip_easy_records_each_rows_loss_against_its_mixed_target(small_comp, small_spec):
    """The cpu preset's skip_easy with mixup: each row's recorded loss is its place's soft-target loss."""
    d = load_competition(small_spec, small_comp)
    cfg = dataclasses.replace(TINY, epochs=3, skip_easy=0.6, mixup=0.8, cutmix=1.0, batch_size=30)
    train, valid = ImageDataset(d.train.images[:480], d.train.labels[:480]), ImageDataset(d.train.images[480:], d.train.labels[480:])
    seen = [r.images for r in fit(_model(cfg), train, valid, cfg, seed=1).history]
    assert seen[0] == seen[2] == len(train) and seen[1] < 0.8 * len(train)  # the middle epoch left easy rows out
