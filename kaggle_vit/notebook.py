"""A Kaggle notebook that carries the whole package: paste-ready, offline, no installs.

The first code cell unpacks an embedded zip of `kaggle_vit/` (and the bundled competition specs)
onto `sys.path`; the next cells configure, run CV, plot and write the submission. Only the Python
API is used, so Typer (the CLI library) need not exist on Kaggle's image.
"""
from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

from .io import write_text
from .spec import CompetitionSpec, bundled_dir

PACKAGE_DIR = Path(__file__).resolve().parent


def package_files() -> list[tuple[str, bytes]]:
    """(archive name, bytes) of every module and bundled spec, sorted so the archive is reproducible."""
    files = [(f"kaggle_vit/{p.relative_to(PACKAGE_DIR).as_posix()}", p.read_bytes())
             for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts]
    files += [(f"kaggle_vit/competitions/{p.name}", p.read_bytes()) for p in sorted(bundled_dir().glob("*.toml"))]
    return files


def package_archive() -> str:
    """The package as a base64 zip with fixed timestamps (same sources → same text)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in package_files():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return base64.b64encode(buf.getvalue()).decode()


def _wrap(text: str, width: int = 100) -> str:
    return "\n".join(text[i : i + width] for i in range(0, len(text), width))


def _spec_lines(spec: CompetitionSpec) -> str:
    """The notebook's COMPETITION: a bundled spec by name; any other spec's TOML embedded and written
    next to the notebook, so the notebook runs for a competition the package does not ship."""
    path = Path(spec.path)
    if path.parent.resolve() == bundled_dir().resolve():
        return f"COMPETITION = {spec.name!r}\n"
    return (f"SPEC_TOML = {path.read_text(encoding='utf-8')!r}  # this competition's spec, written next to the notebook\n"
            "_spec_dir = KAGGLE_ROOT / 'working' if (KAGGLE_ROOT / 'working').is_dir() else Path('.')\n"
            f"(_spec_dir / {spec.name + '.toml'!r}).write_text(SPEC_TOML)\n"
            f"COMPETITION = str(_spec_dir / {spec.name + '.toml'!r})\n")


def _cells(spec: CompetitionSpec) -> list[tuple[str, str]]:
    archive = _wrap(package_archive())
    return [
        ("markdown", f"# {spec.title}: a Vision Transformer with k-fold CV (kaggle-vit)\n\n"
                     "Runs offline with Kaggle's preinstalled packages (torch, timm, albumentations, pandas, "
                     "scikit-learn, optuna, rich, matplotlib). The first cell carries the whole `kaggle_vit` "
                     "package; paste it into any notebook and `import kaggle_vit` works."),
        ("code", "# kaggle-vit package, embedded: unpacked next to this notebook and put on sys.path\n"
                 "import base64, io, sys, zipfile, pathlib\n"
                 "_KVIT = '''\n" + archive + "\n'''\n"
                 "_work = pathlib.Path('/kaggle/working')\n"
                 "_dest = (_work if _work.is_dir() else pathlib.Path('.')) / 'kvit_pkg'\n"
                 "zipfile.ZipFile(io.BytesIO(base64.b64decode(''.join(_KVIT.split())))).extractall(_dest)\n"
                 "sys.path.insert(0, str(_dest.resolve()))\n"
                 "import kaggle_vit\n"
                 "print('kaggle_vit', kaggle_vit.__version__, 'from', kaggle_vit.__file__)\n"
                 "print(kaggle_vit.check_versions())  # one clear line if this image's packages are too old"),
        ("code", "# Configuration: the CPU preset; on a GPU session the GPU preset is chosen.\n"
                 "from pathlib import Path\n"
                 "import torch\n"
                 "KAGGLE_ROOT = Path('/kaggle')\n"
                 + _spec_lines(spec) +
                 "PRESET = 'gpu' if torch.cuda.is_available() else 'cpu'\n"
                 "# Weights attached as a Kaggle dataset (timm .safetensors/.pth/.bin, or a kaggle-vit fold's\n"
                 "# model.safetensors): the run fine-tunes from the first found; set PRETRAINED = None to train from scratch.\n"
                 "from kaggle_vit import find_weights, load_spec\n"
                 "PRETRAINED = find_weights(KAGGLE_ROOT / 'input', skip=(load_spec(COMPETITION).slug,))\n"
                 "print('fine-tuning from', PRETRAINED) if PRETRAINED else print('training from scratch')\n"
                 "# e.g. {'epochs': 10, 'folds': 5}; or {'time_budget': 8 * 3600}: the epochs that fit in 8 hours, measured\n"
                 "OVERRIDES = {}\n"
                 "MAX_TRAIN_ROWS = None  # e.g. 5000 for a quick look"),
        ("code", "# Data: Kaggle's input folder when the competition is attached, else `ensure_data` (offline build)\n"
                 "import dataclasses\n"
                 "from kaggle_vit import load_spec, ensure_data, load_competition, resolve_config\n"
                 "spec = load_spec(COMPETITION)\n"
                 "input_dir = KAGGLE_ROOT / 'input' / spec.slug\n"
                 "work_dir = KAGGLE_ROOT / 'working' if (KAGGLE_ROOT / 'working').is_dir() else Path('.')\n"
                 "if input_dir.is_dir():\n"
                 "    data = load_competition(spec, input_dir)\n"
                 "else:\n"
                 "    data = ensure_data(spec, work_dir / 'data' / spec.name).data\n"
                 "if MAX_TRAIN_ROWS:\n"
                 "    data = dataclasses.replace(data, train=dataclasses.replace(\n"
                 "        data.train, images=data.train.images[:MAX_TRAIN_ROWS], labels=data.train.labels[:MAX_TRAIN_ROWS],\n"
                 "        ids=data.train.ids[:MAX_TRAIN_ROWS]))\n"
                 "cfg = resolve_config(PRESET, competition=COMPETITION, pretrained=PRETRAINED, **OVERRIDES)\n"
                 "print(len(data.train), 'training rows,', len(data.test), 'test rows;', cfg)"),
        ("code", "# Cross-validation: one model per stratified fold\n"
                 "from kaggle_vit import run_cv\n"
                 "from kaggle_vit.progress import LineProgress\n"
                 "run_dir = work_dir / 'runs' / spec.name / 'cv'\n"
                 "cv = run_cv(cfg, data, run_dir, progress=LineProgress(), on_plan=lambda plan: print(plan.line()))\n"
                 "print(f'OOF {cv.metrics.metric} {cv.metrics.oof_score_views:.4f}, accuracy {100 * cv.metrics.oof_acc_views:.2f}%')"),
        ("code", "# Curves, test predictions, OOF mistakes, confusion matrix, attention\n"
                 "from IPython.display import Image, display\n"
                 "from kaggle_vit import make_report\n"
                 "for png in make_report(run_dir, data):\n"
                 "    display(Image(filename=str(png)))"),
        ("code", "# Fold ensemble → submission.csv\n"
                 "from kaggle_vit import make_submission\n"
                 "sub = make_submission(run_dir, data, work_dir / 'submission.csv', force=True)  # this notebook's own file\n"
                 "print('wrote', sub.path, 'from folds', sub.folds, 'class counts', sub.class_counts)"),
    ]


def build_notebook(spec: CompetitionSpec) -> dict:
    """The notebook as nbformat-4 JSON (a dict)."""
    cells = []
    for i, (kind, source) in enumerate(_cells(spec)):
        cell = {"cell_type": kind, "id": f"cell-{i}", "metadata": {}, "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                                         "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def write_notebook(spec: CompetitionSpec, path: Path) -> Path:
    """Write the notebook atomically; the same sources always give the same file."""
    return write_text(path, json.dumps(build_notebook(spec), indent=1, sort_keys=True) + "\n")
