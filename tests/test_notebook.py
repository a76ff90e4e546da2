import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from kaggle_vit.notebook import build_notebook
from kaggle_vit.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_committed_notebook_is_in_sync():
    committed = ROOT / "notebooks" / "digit-recognizer.ipynb"
    fresh = json.dumps(build_notebook(load_spec("digit-recognizer")), indent=1, sort_keys=True) + "\n"
    assert committed.read_text() == fresh, "regenerate it: kaggle-vit notebook"


TINY_OVERRIDES = "'epochs': 1, 'folds': 2, 'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'num_workers': 0"


def run_like_kaggle(nb, kaggle: Path, overrides: str, cwd: Path) -> None:
    """Execute the notebook in a real Jupyter kernel with `kaggle` as /kaggle (its input/ already
    filled, working/ made here), the CPU preset and a tiny model (`overrides`: dict items as text)."""
    (kaggle / "working").mkdir()
    config = nb.cells[2]
    config.source = (config.source.replace("Path('/kaggle')", f"Path({str(kaggle)!r})")
                     .replace("OVERRIDES = {}", f"OVERRIDES = {{{overrides}}}")
                     .replace("PRESET = 'gpu' if torch.cuda.is_available() else 'cpu'", "PRESET = 'cpu'"))
    nb.cells[1].source = nb.cells[1].source.replace("pathlib.Path('/kaggle/working')", f"pathlib.Path({str(kaggle / 'working')!r})")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()


def test_generated_notebook_runs_like_on_kaggle(tmp_path, small_comp):
    kaggle = tmp_path / "kaggle"
    shutil.copytree(small_comp, kaggle / "input" / "digit-recognizer")
    nb = nbformat.reads(json.dumps(build_notebook(load_spec("digit-recognizer"))), as_version=4)
    run_like_kaggle(nb, kaggle, TINY_OVERRIDES, tmp_path)
    sub = pd.read_csv(kaggle / "working" / "submission.csv")
    assert list(sub.columns) == ["ImageId", "Label"] and len(sub) == 200 and sub["Label"].between(0, 9).all()
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # curves, predictions, confusion, mistakes (and attention) shown inline
    first = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert str(kaggle / "working" / "kvit_pkg" / "kaggle_vit" / "__init__.py") in first


def test_walkthrough_uses_only_the_public_api():
    import ast

    import kaggle_vit

    nb = json.loads((ROOT / "notebooks" / "walkthrough.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            tree = ast.parse("".join(cell["source"]))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kv":
                    assert node.attr in kaggle_vit.__all__, node.attr


@pytest.mark.parametrize("bundled", [True, False])
def test_notebook_for_an_image_file_competition_runs(tmp_path, mnist, bundled):
    """cifar-10's layout (PNG files, class names), attached as Kaggle attaches it; the second case
    gives the spec as a file the package does not ship, so the notebook carries its TOML."""
    from test_bundled import build_fixture

    spec = load_spec("cifar-10")
    if not bundled:
        own = tmp_path / "my-cifar.toml"
        own.write_text(Path(spec.path).read_text().replace('name = "cifar-10"', 'name = "my-cifar"'))
        spec = load_spec(own)
    kaggle = tmp_path / "kaggle"
    test_ids, _ = build_fixture(spec, kaggle / "input" / spec.slug, mnist)
    if bundled:  # a kvit trained on 28x28 grey digits, attached as a dataset: the notebook fine-tunes from it
        from test_pretrained import _fold_checkpoint

        (kaggle / "input" / "kvit-mnist").mkdir()
        _fold_checkpoint(kaggle / "input" / "kvit-mnist" / "model.pt")
    nb = nbformat.reads(json.dumps(build_notebook(spec)), as_version=4)
    assert ("SPEC_TOML" in nb.cells[2].source) != bundled
    run_like_kaggle(nb, kaggle, TINY_OVERRIDES + ", 'patch_size': 8, 'tta': 2", tmp_path)
    sub = pd.read_csv(kaggle / "working" / "submission.csv", dtype=str)
    assert list(sub.columns) == ["id", "label"] and sub["id"].tolist() == test_ids
    assert set(sub["label"]) <= set(spec.class_names)
    assert "OOF accuracy " in "".join(o.get("text", "") for o in nb.cells[4].outputs)
    said = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert (f"fine-tuning from {kaggle / 'input' / 'kvit-mnist' / 'model.pt'}" in said) == bundled, said
    config = next((kaggle / "working" / "runs").rglob("config.toml")).read_text()
    assert ("pretrained = " in config and "patch_size" not in config) == bundled  # the weights' shape, not patch 8
