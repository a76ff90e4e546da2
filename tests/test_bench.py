import json

import pytest
from typer.testing import CliRunner

from kaggle_vit.bench import timm_twin
from kaggle_vit.cli import app
from kaggle_vit.models.vit import KaggleViT

runner = CliRunner()


def test_timm_twin_has_the_same_shape():
    ours = KaggleViT(patch_size=7, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)
    twin = timm_twin(ours)
    assert type(twin).__name__ == "VisionTransformer" and len(twin.blocks) == 3
    assert twin.patch_embed.proj.kernel_size == (7, 7) and twin.embed_dim == 48
    assert twin.blocks[0].mlp.fc1.out_features == 96 and twin.pos_embed.shape == ours.pos_embed.shape
    same = KaggleViT(patch_size=7, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, stem_channels=0)
    assert sum(p.numel() for p in same.parameters()) == sum(p.numel() for p in twin.parameters())


def test_bench_reports_ratios_as_json(small_comp):
    result = runner.invoke(app, ["bench", "--data-dir", str(small_comp), "--rounds", "1", "--set", "batch_size=32",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    modes = {(r["name"], r["mode"]) for r in report["rows"]}
    assert ("timm VisionTransformer", "train") in modes and ("kvit_pico_patch4_28", "infer") in modes
    assert report["train_ratio_vs_timm"] > 0 and report["data_vs_train_ratio"] > 0
    assert all(r["images_per_s"] > 0 for r in report["rows"])
    assert ("bare training step", "train") in modes and ("cv training loop", "train") in modes
    rate = {r["name"]: r["images_per_s"] for r in report["rows"] if r["mode"] == "train"}
    assert report["loop_vs_bare_ratio"] == pytest.approx(rate["cv training loop"] / rate["bare training step"])
    assert report["gpu_utilization"] is None and report["amp"] == "off"  # NVML only on CUDA
