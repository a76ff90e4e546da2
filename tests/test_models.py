import pytest
import timm
import torch

import kaggle_vit  # noqa: F401  (registers the kvit family)
from kaggle_vit.config import TrainConfig
from kaggle_vit.errors import KaggleVitError
from kaggle_vit.models.factory import create_model, fitting_patch_size
from kaggle_vit.models.vit import KaggleViT
from kaggle_vit.spec import load_spec


@pytest.mark.parametrize("patch, chans, size", [(2, 1, 28), (4, 1, 28), (7, 3, 28), (14, 1, 28), (4, 3, 32), (8, 1, 32)])
def test_shapes_for_patch_sizes_and_channels(patch, chans, size):
    model = KaggleViT(img_size=size, patch_size=patch, in_chans=chans, num_classes=7, embed_dim=32, depth=2,
                      num_heads=2, stem_channels=8)
    x = torch.randn(3, chans, size, size)
    assert model(x).shape == (3, 7)
    tokens = (size // patch) ** 2 + 1
    assert model.forward_features(x).shape == (3, tokens, 32)
    maps = model.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, tokens, tokens)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 2, tokens), atol=1e-5)


@pytest.mark.parametrize("pool", [False, True])
def test_conv_stem_downsamples_by_the_patch_size(pool):
    model = KaggleViT(patch_size=4, embed_dim=32, depth=1, num_heads=2, stem_channels=8, stem_pool=pool)
    convs = [m for m in model.stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]  # channels double at each stage
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.stem) == pool
    assert model.stem(torch.randn(2, 1, 28, 28)).shape == (2, 16, 7, 7)
    assert model.patch_embed.kernel_size == (1, 1)


def test_linear_init_scales_with_width():
    wide, narrow = KaggleViT(embed_dim=256, depth=1, num_heads=4), KaggleViT(embed_dim=32, depth=1, num_heads=4)
    for model, width in ((wide, 256), (narrow, 32)):
        assert abs(model.blocks[0].attn.qkv.weight.std().item() - width ** -0.5) < 0.1 * width ** -0.5


def test_explicit_attention_matches_fused_kernel():
    model = KaggleViT(embed_dim=32, depth=2, num_heads=4).eval()
    x = torch.randn(2, 1, 28, 28)
    tokens = model._tokens(x)
    block = model.blocks[0]
    fused, _ = block(tokens)
    explicit, weights = block(tokens, return_attention=True)
    assert weights is not None and torch.allclose(fused, explicit, atol=1e-5)


def test_timm_registry_round_trip():
    names = timm.list_models("kvit*")
    assert {"kvit_pico_patch7_28", "kvit_tiny_patch4_28", "kvit_base_patch4_28"} <= set(names)
    model = timm.create_model("kvit_tiny_patch4_28", num_classes=10, in_chans=1)
    assert isinstance(model, KaggleViT) and model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    custom = timm.create_model("kvit_pico_patch4_28", num_classes=47, in_chans=3, img_size=32, patch_size=8,
                               embed_dim=48, depth=3, num_heads=3, drop_rate=0.1, drop_path_rate=0.1)
    assert custom(torch.randn(1, 3, 32, 32)).shape == (1, 47) and len(custom.blocks) == 3
    with pytest.raises(ValueError, match="does not divide"):
        timm.create_model("kvit_pico_patch4_28", patch_size=5)


def test_timm_reference_vit_shaped_to_competition():
    spec = load_spec("digit-recognizer")
    assert fitting_patch_size(spec) == 4
    model = create_model(TrainConfig(model="vit_tiny_patch16_224", depth=2), spec)
    assert type(model).__name__ == "VisionTransformer"
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(KaggleVitError, match="patch_size 5 does not divide 28x28"):
        create_model(TrainConfig(patch_size=5), spec)
    with pytest.raises(KaggleVitError, match="unknown model"):
        create_model(TrainConfig(model="no_such_model"), spec)


@pytest.mark.parametrize("depth, qkv_bias", [(1, True), (2, True), (3, False)])
def test_class_token_shortcut_gives_the_full_models_logits_and_gradients(depth, qkv_bias):
    # forward() runs the last block for the class token only; it must equal the full computation.
    torch.manual_seed(0)
    model = KaggleViT(embed_dim=32, depth=depth, num_heads=4, stem_channels=8, qkv_bias=qkv_bias)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.allclose(model(x), model.forward_head(model.forward_features(x)), atol=1e-5)
    model.train()  # batch norm in the stem uses batch statistics: both paths see the same batch
    grads = []
    for run in (model, lambda t: model.forward_head(model.forward_features(t))):
        model.zero_grad()
        torch.nn.functional.cross_entropy(run(x), torch.arange(4)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for fast, full in zip(*grads):
        assert torch.allclose(fast, full, atol=1e-5)
    tokens = model.eval()._tokens(x)
    assert torch.allclose(model.blocks[-1].forward_class(tokens), model.blocks[-1](tokens)[0][:, :1], atol=1e-5)
