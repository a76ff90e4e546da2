"""Any timm image classifier by name (`--model convnext_atto`, `resnet18`, ...): each builds for the
competition's channels, classes and image size, trains through the same loop, loads local 3-channel
ImageNet-shaped weights into a grey 10-class model, and runs `cv` then `submit` through the CLI."""
from __future__ import annotations

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.models.factory import create_model
from kaggle_vit.spec import load_spec
from kaggle_vit.train.dataset import resolve_data_config
from kaggle_vit.train.engine import NoProgress, make_trainer, train_one_epoch

runner = CliRunner()
CNNS = ["convnext_atto", "resnet18", "efficientnet_b0"]
MODELS = [*CNNS, "deit_tiny_distilled_patch16_224", "kvit_pico_patch4_28"]
SPECS = {"grey 28x28": "digit-recognizer", "RGB 32x32": "cifar-10"}


@pytest.mark.parametrize("shape", SPECS)
@pytest.mark.parametrize("name", MODELS)
def test_each_model_trains_a_step_at_the_competitions_shape(name, shape):
    spec = load_spec(SPECS[shape])
    cfg = TrainConfig(model=name, device="cpu", epochs=1, batch_size=4, warmup_epochs=0.0)
    torch.manual_seed(0)
    model = create_model(cfg, spec)
    data_config = resolve_data_config(model)
    assert data_config.input_size == (spec.channels, spec.height, spec.width)  # trained at its size, not 224
    images = torch.randint(0, 256, (4, spec.channels, spec.height, spec.width), dtype=torch.uint8)
    x, y = data_config.prepare(images), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(make_trainer(model, cfg, steps_per_epoch=1), [(x, y, None)], 1, NoProgress())
    assert stats["seen"] == 4 and torch.isfinite(torch.tensor(stats["train_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        assert model.eval()(x).shape == (4, spec.num_classes)


@pytest.mark.parametrize("name", [*CNNS, "deit_tiny_distilled_patch16_224"])
def test_imagenet_weights_load_into_a_grey_ten_class_model(tmp_path, name):
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False)  # 3 channels, 1000 classes
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model(TrainConfig(model=name, pretrained=str(path)), load_spec("digit-recognizer"))
    first, heads = model.pretrained_cfg["first_conv"], model.pretrained_cfg["classifier"]
    heads = (heads,) if isinstance(heads, str) else heads
    old, new = source.state_dict(), model.state_dict()
    for head in heads:  # re-initialised for 10 classes
        assert new[f"{head}.weight"].shape[0] == 10
    # timm's adapt_input_conv: a grey input sees the sum of the RGB filters
    torch.testing.assert_close(new[f"{first}.weight"], old[f"{first}.weight"].sum(1, keepdim=True))
    kept = [k for k in new if not k.startswith((first, *heads))]
    assert kept and all(torch.equal(new[k], old[k]) for k in kept)
    assert resolve_data_config(model).input_size == (1, 224, 224)  # the weights' size, as a pretrained ViT's
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 224, 224)).shape == (2, 10)


def test_a_setting_the_model_has_no_keyword_for_and_an_unknown_name_are_one_line():
    spec = load_spec("digit-recognizer")
    with pytest.raises(KaggleVitError, match="^depth does not apply to resnet18"):
        create_model(TrainConfig(model="resnet18", depth=4), spec)
    with pytest.raises(KaggleVitError, match="^attn_drop_rate does not apply to convnext_atto"):
        create_model(TrainConfig(model="convnext_atto", attn_drop_rate=0.1), spec)
    with pytest.raises(KaggleVitError, match=r"unknown model 'resnet_nine' \(ours: kvit_.*any timm image classifier"):
        create_model(TrainConfig(model="resnet_nine"), spec)


def test_cv_then_submit_a_cnn_through_the_cli(small_comp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cnn.toml"
    config.write_text(to_toml(TrainConfig(model="resnet18", epochs=1, batch_size=64, folds=2, device="cpu",
                                          num_workers=0, tta=1, jobs=1)))
    result = runner.invoke(app, ["cv", "--config", str(config), "--data-dir", str(small_comp), "--fold", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "runs" / "digit-recognizer").glob("resnet18-*"))
    assert len(runs) == 1 and (runs[0] / "fold1" / "model.safetensors").is_file()
    sub = runner.invoke(app, ["submit", str(runs[0]), "--fold", "1", "--data-dir", str(small_comp),
                              "-o", str(tmp_path / "sub.csv")])
    assert sub.exit_code == 0, sub.output
    submission = pd.read_csv(tmp_path / "sub.csv")
    assert list(submission.columns) == ["ImageId", "Label"] and len(submission) == 200
    assert submission["Label"].between(0, 9).all()
