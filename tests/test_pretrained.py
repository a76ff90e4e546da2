"""`pretrained = PATH` (`cv --set pretrained=PATH`): local timm weights and kaggle-vit fold checkpoints load back exactly, fit a
new competition (head re-initialised, position embedding resampled, input convolution adapted), set
the data config, and a missing or unfitting file is one line with exit status 2."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import kaggle_vit.models.vit  # noqa: F401  (registers the kvit_* family with timm)
from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.models.checkpoint import save_checkpoint
from kaggle_vit.models.factory import create_model, create_pretrained, model_kwargs
from kaggle_vit.models.pretrained import find_weights, read_weights
from kaggle_vit.records import CheckpointHeader, to_json
from kaggle_vit.run.settings import resolve_config
from kaggle_vit.spec import load_spec
from kaggle_vit.train.dataset import resolve_data_config

runner = CliRunner()
SMALL_KVIT = dict(embed_dim=32, depth=1, num_heads=2)


def _same(a: dict, b: dict, skip: tuple[str, ...] = ()) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith(skip))


@pytest.fixture(scope="module")
def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)


@pytest.mark.parametrize("form", ["model.safetensors", "pytorch_model.bin", "checkpoint.pth"])
def test_timm_weights_round_trip_exactly(tmp_path, timm_vit, form):
    path = tmp_path / form
    if path.suffix == ".safetensors":
        save_file(timm_vit.state_dict(), str(path))
    elif path.suffix == ".bin":
        torch.save(timm_vit.state_dict(), path)
    else:  # a timm train.py checkpoint: the state dict under 'state_dict'
        torch.save({"epoch": 3, "state_dict": timm_vit.state_dict()}, path)
    loaded = create_pretrained("vit_tiny_patch16_224", {"num_classes": 1000}, path)
    assert _same(loaded.state_dict(), timm_vit.state_dict())


def test_other_classes_and_channels_reinitialise_the_head_and_adapt_the_input(tmp_path, timm_vit):
    path = tmp_path / "model.safetensors"
    save_file(timm_vit.state_dict(), str(path))
    source = timm_vit.state_dict()
    model = create_pretrained("vit_tiny_patch16_224", {"num_classes": 10, "in_chans": 1}, path)
    state = model.state_dict()
    assert state["head.weight"].shape == (10, 192)
    assert _same({k: v for k, v in state.items() if k not in ("head.weight", "head.bias", "patch_embed.proj.weight")},
                 {k: v for k, v in source.items() if k not in ("head.weight", "head.bias", "patch_embed.proj.weight")})
    # timm's adapt_input_conv: a grey input sees the sum of the RGB filters
    torch.testing.assert_close(state["patch_embed.proj.weight"], source["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_a_pretrained_timm_model_keeps_its_patch_size_and_takes_its_data_config(tmp_path):
    spec = load_spec("digit-recognizer")
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit.safetensors"
    save_file(deit.state_dict(), str(path))
    cfg = TrainConfig(model="deit_tiny_patch16_224", pretrained=str(path))
    assert "patch_size" not in model_kwargs(cfg, spec) and "img_size" not in model_kwargs(cfg, spec)
    data_config = resolve_data_config(create_model(cfg, spec))
    assert data_config.input_size == (1, 224, 224)  # the weights' size; grey, as the competition
    assert data_config.mean == pytest.approx((0.485, 0.456, 0.406))  # ImageNet's, from the weights' config
    digits = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    assert data_config.prepare(digits).shape == (2, 1, 224, 224)  # resized on the way in
    with pytest.raises(KaggleVitError, match="keeps the patch size"):
        model_kwargs(TrainConfig(model="deit_tiny_patch16_224", pretrained=str(path), patch_size=4), spec)


def _fold_checkpoint(path: Path, num_classes: int = 10) -> dict:
    """A file laid out as `kaggle-vit cv` writes fold1/model.safetensors, or (model.pt) as an older
    kaggle-vit wrote it."""
    torch.manual_seed(1)
    kwargs = dict(num_classes=num_classes, in_chans=1, img_size=(28, 28), **SMALL_KVIT)
    model = timm.create_model("kvit_pico_patch4_28", **kwargs)
    header = CheckpointHeader(model="kvit_pico_patch4_28", kwargs=kwargs, fold=1, competition="digit-recognizer",
                              input_size=(1, 28, 28), num_classes=num_classes, class_names=tuple("0123456789"),
                              valid_acc=0.9)
    if path.suffix == ".safetensors":
        save_checkpoint(path, model.state_dict(), header)
    else:
        torch.save({**to_json(header), "state_dict": model.state_dict()}, path)
    return model.state_dict()


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_a_fold_checkpoint_transfers_to_another_competition(tmp_path, name):
    source = _fold_checkpoint(tmp_path / name)
    spec = load_spec("cifar-10")  # 32x32 RGB, ten class names
    cfg = resolve_config(competition="cifar-10", pretrained=str(tmp_path / name), model="vit_tiny_patch16_224",
                         embed_dim=64)
    # the checkpoint names its model and shape; they replace the config's
    assert (cfg.model, cfg.embed_dim, cfg.depth, cfg.num_heads) == ("kvit_pico_patch4_28", 32, 1, 2)
    model = create_model(cfg, spec)
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 1 + 8 * 8, 32)  # 7x7 grid resampled to 8x8
    torch.testing.assert_close(state["pos_embed"][:, 0], source["pos_embed"][:, 0])  # class token kept
    torch.testing.assert_close(state["stem.0.weight"], source["stem.0.weight"].repeat(1, 3, 1, 1) / 3)
    assert _same({k: v for k, v in state.items() if k.startswith("blocks")},
                 {k: v for k, v in source.items() if k.startswith("blocks")})
    same_task = create_model(resolve_config(competition="digit-recognizer", pretrained=str(tmp_path / name)),
                             load_spec("digit-recognizer"))
    assert _same(same_task.state_dict(), source)  # same competition: back exactly, head included


def test_a_different_class_count_gets_a_fresh_head(tmp_path):
    source = _fold_checkpoint(tmp_path / "model.safetensors", num_classes=5)
    model = create_model(resolve_config(competition="digit-recognizer", pretrained=str(tmp_path / "model.safetensors")),
                         load_spec("digit-recognizer"))
    assert model.state_dict()["head.weight"].shape == (10, 32)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items() if not k.startswith("head"))


def test_unfitting_and_unreadable_weights_are_one_line(tmp_path, timm_vit):
    spec = load_spec("digit-recognizer")
    path = tmp_path / "model.safetensors"
    save_file(timm_vit.state_dict(), str(path))
    with pytest.raises(KaggleVitError, match=r"do not fit vit_small_patch16_224: size mismatch for cls_token"):
        create_model(TrainConfig(model="vit_small_patch16_224", pretrained=str(path)), spec)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(KaggleVitError, match="broken.pth: not a readable weights file"):
        read_weights(tmp_path / "broken.pth")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(KaggleVitError, match="expected a .safetensors"):
        read_weights(tmp_path / "notes.txt")


def test_cli_refuses_missing_and_unfitting_weights_in_one_line(tmp_path, small_comp, timm_vit):
    base = ["cv", "--data-dir", str(small_comp), "--run-dir", str(tmp_path / "run"), "--quiet"]
    missing = runner.invoke(app, [*base, "--set", f"pretrained={tmp_path / 'nope.safetensors'}"])
    assert missing.exit_code == 2 and missing.output.strip().count("\n") == 0, missing.output
    assert "nope.safetensors: no such file" in missing.output
    path = tmp_path / "weights.safetensors"
    save_file(timm_vit.state_dict(), str(path))
    wrong = runner.invoke(app, [*base, "--set", f"pretrained={path}"])  # tiny-ViT weights for the kvit default
    assert wrong.exit_code == 2 and "do not fit kvit_pico_patch4_28" in wrong.output, wrong.output
    assert wrong.output.strip().count("\n") == 0 and not (tmp_path / "run").exists()


def test_cv_fine_tunes_from_a_fold_checkpoint(tmp_path, small_comp):
    """Train one fold, then start a second run from its model.safetensors: the run records the weights and
    its first epoch starts where the first run ended, not from scratch."""
    tiny = ["--data-dir", str(small_comp), "--epochs", "1", "--folds", "2", "--fold", "1", "--jobs", "1", "--quiet",
            "--set", "num_workers=0", "--set", "tta=1"]
    first = runner.invoke(app, ["cv", *tiny, "--run-dir", str(tmp_path / "a"), "--config", str(_tiny_toml(tmp_path))])
    assert first.exit_code == 0, first.output
    weights = tmp_path / "a" / "fold1" / "model.safetensors"
    scratch_acc = pd.read_csv(tmp_path / "a" / "fold1" / "history.csv")["valid_acc"].iloc[0]
    second = runner.invoke(app, ["cv", *tiny, "--run-dir", str(tmp_path / "b"), "--set", f"pretrained={weights}"])
    assert second.exit_code == 0, second.output
    assert f'pretrained = "{weights}"' in (tmp_path / "b" / "config.toml").read_text()
    assert 'embed_dim = 32' in (tmp_path / "b" / "config.toml").read_text()  # the checkpoint's shape
    tuned_acc = pd.read_csv(tmp_path / "b" / "fold1" / "history.csv")["valid_acc"].iloc[0]
    assert tuned_acc > scratch_acc  # a second epoch's worth of learning, on the same fold


def _tiny_toml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text("embed_dim = 32\ndepth = 1\nnum_heads = 2\nbatch_size = 32\n")
    return path


def test_weights_named_after_a_tagged_timm_model_pick_it(tmp_path, timm_vit):
    path = tmp_path / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
    save_file(timm_vit.state_dict(), str(path))
    cfg = resolve_config(competition="digit-recognizer", pretrained=str(path))
    assert cfg.model == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    model = create_model(cfg, load_spec("digit-recognizer"))
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], timm_vit.state_dict()["blocks.0.attn.qkv.weight"])


def test_find_weights_skips_the_competition_folder(tmp_path):
    (tmp_path / "digit-recognizer").mkdir()
    (tmp_path / "digit-recognizer" / "a.pt").write_bytes(b"")
    assert find_weights(tmp_path, skip=("digit-recognizer",)) is None
    (tmp_path / "vit-weights" / "vit_tiny_patch16_224").mkdir(parents=True)
    (tmp_path / "vit-weights" / "vit_tiny_patch16_224" / "model.safetensors").write_bytes(b"")
    assert find_weights(tmp_path, skip=("digit-recognizer",)).name == "model.safetensors"
    assert find_weights(tmp_path / "absent") is None
