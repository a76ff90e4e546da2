"""Every bundled spec, end to end on a small fixture of real MNIST digits laid out exactly as that
Kaggle competition ships its files (names, extensions, columns, image sizes): data → cv → submit
gives a submission with the right columns, ids and form, and `score` computes its metric."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.metrics import EPS
from kaggle_vit.spec import CompetitionSpec, list_competitions, load_spec

runner = CliRunner()
BUNDLED = ["Kannada-MNIST", "cifar-10", "aerial-cactus-identification", "histopathologic-cancer-detection",
           "plant-seedlings-classification", "dog-breed-identification"]
# Labels for competitions whose specs let the training labels name the classes: ten real names each.
DISCOVERED = {"plant-seedlings-classification": ["Black-grass", "Charlock", "Cleavers", "Common Chickweed", "Common wheat",
                                                 "Fat Hen", "Loose Silky-bent", "Maize", "Scentless Mayweed",
                                                 "Small-flowered Cranesbill"],
              "dog-breed-identification": ["affenpinscher", "afghan_hound", "african_hunting_dog", "airedale",
                                           "american_staffordshire_terrier", "appenzeller", "australian_terrier",
                                           "basenji", "basset", "beagle"]}
N_TRAIN, N_TEST = 80, 20


def _names(spec: CompetitionSpec) -> list[str]:
    return list(spec.class_names) or DISCOVERED[spec.name]


def _label(spec: CompetitionSpec, digit: int) -> str:
    names = _names(spec)
    return names[digit % 2] if len(names) == 2 else names[digit % len(names)]  # binary: odd digits


def _image(digit: np.ndarray, spec: CompetitionSpec) -> Image.Image:
    """A 28x28 digit as the competition's images come: RGB, at its size."""
    return Image.fromarray(digit).convert("RGB").resize((spec.width, spec.height))


def build_fixture(spec: CompetitionSpec, root: Path, mnist) -> tuple[list[str], list[str]]:
    """Write the competition's files into `root`; return the test ids and their true labels."""
    tx, ty, vx, vy = mnist
    train_labels = [_label(spec, int(d)) for d in ty[:N_TRAIN]]
    truth = [_label(spec, int(d)) for d in vy[:N_TEST]]
    root.mkdir(parents=True)
    if spec.layout == "pixels":  # Kannada-MNIST: label + pixels; test.csv carries id (from 0)
        pixels = spec.pixel_columns
        pd.concat([pd.DataFrame({spec.label_column: train_labels}), pd.DataFrame(tx[:N_TRAIN].reshape(N_TRAIN, -1), columns=pixels)],
                  axis=1).to_csv(root / spec.train_file, index=False)
        test_ids = [str(i) for i in range(N_TEST)]
        pd.concat([pd.DataFrame({spec.id_column: range(N_TEST)}), pd.DataFrame(vx[:N_TEST].reshape(N_TEST, -1), columns=pixels)],
                  axis=1).to_csv(root / spec.test_file, index=False)
    elif spec.layout == "files":
        ext = spec.image_extension or ".jpg"  # aerial-cactus: the ids carry ".jpg" themselves
        name = (lambda i: f"{i:08x}") if spec.image_extension else (lambda i: f"{i:08x}.jpg")
        for folder, digits, first in ((spec.train_images, tx[:N_TRAIN], 0), (spec.test_images, vx[:N_TEST], 10_000)):
            (root / folder).mkdir()
            for i, digit in enumerate(digits):
                _image(digit, spec).save(root / folder / (name(first + i) + ("" if not spec.image_extension else ext)))
        pd.DataFrame({spec.id_column: [name(i) for i in range(N_TRAIN)], spec.label_column: train_labels}).to_csv(
            root / spec.train_file, index=False)
        test_ids = [name(10_000 + i) for i in range(N_TEST)]
    else:  # folders: train/<species>/<file>.png, test/<file>.png
        for i, (digit, label) in enumerate(zip(tx[:N_TRAIN], train_labels)):
            (root / spec.train_images / label).mkdir(parents=True, exist_ok=True)
            _image(digit, spec).resize((spec.width + 7 * (i % 3), spec.height + 7 * (i % 3))).save(
                root / spec.train_images / label / f"{i:09x}.png")
        (root / spec.test_images).mkdir()
        test_ids = [f"{i:09x}.png" for i in range(N_TEST)]
        for file, digit in zip(test_ids, vx[:N_TEST]):
            _image(digit, spec).save(root / spec.test_images / file)
    header = [spec.submission_columns[0], *sorted(set(train_labels))] if spec.submission_form == "class_probabilities" \
        else spec.submission_header()
    sample = pd.DataFrame({header[0]: test_ids, **{c: "0" if spec.submission_form == "label" else 0.5 for c in header[1:]}})
    sample.to_csv(root / spec.sample_submission_file, index=False)
    pd.DataFrame({spec.solution_columns[0]: test_ids, spec.solution_columns[1]: truth}).to_csv(root / spec.solution_file,
                                                                                                index=False)
    return test_ids, truth


def test_the_bundled_specs_are_listed():
    assert set(BUNDLED) <= set(list_competitions())


@pytest.mark.parametrize("name", BUNDLED)
def test_fixture_cv_submit_score(name, tmp_path, mnist, monkeypatch):
    spec = load_spec(name)
    data_dir = tmp_path / "data" / name
    test_ids, truth = build_fixture(spec, data_dir, mnist)
    patch = {28: 7, 32: 8}.get(spec.height, 16)
    (tmp_path / "tiny.toml").write_text(
        f'model = "kvit_pico_patch4_28"\npatch_size = {patch}\nembed_dim = 32\ndepth = 1\nnum_heads = 2\nepochs = 1\n'
        f'folds = 2\nbatch_size = 32\ndevice = "cpu"\nnum_workers = 0\ntta = 2\n'
        f'jobs = {1 if spec.layout == "pixels" else 2}\n')  # image files: file-name ids through fold workers too
    monkeypatch.chdir(tmp_path)
    args = ["--competition", name]
    cv = runner.invoke(app, ["cv", *args, "--config", "tiny.toml", "--quiet"])
    assert cv.exit_code == 0, cv.output
    sub = runner.invoke(app, ["submit", *args])
    assert sub.exit_code == 0, sub.output
    frame = pd.read_csv("submission.csv", dtype={0: str} if spec.layout != "pixels" else None)
    names = sorted(set(_label(spec, int(d)) for d in mnist[1][:N_TRAIN])) if not spec.class_names else list(spec.class_names)
    if spec.submission_form == "class_probabilities":
        assert list(frame.columns) == [spec.submission_columns[0], *names]
        np.testing.assert_allclose(frame.iloc[:, 1:].to_numpy().sum(1), 1, atol=1e-5)
        values = frame.iloc[:, 1:].to_numpy()
    else:
        assert list(frame.columns) == list(spec.submission_columns)
        values = frame.iloc[:, 1]
    assert [str(i) for i in frame.iloc[:, 0]] == test_ids
    if spec.submission_form == "label":
        assert set(values.astype(str)) <= set(names)
    else:
        assert np.asarray(values, dtype=float).min() >= EPS and np.asarray(values, dtype=float).max() <= 1 - EPS
    score = runner.invoke(app, ["score", "submission.csv", *args])
    assert score.exit_code == 0 and f": {spec.metric} " in score.output.splitlines()[0], score.output
