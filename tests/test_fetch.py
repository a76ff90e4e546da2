import gzip
import struct
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from kaggle_vit.cli import app
from kaggle_vit.data.fetch import ensure_data, kaggle_credentials_present
from kaggle_vit.data.layouts import load_competition
from kaggle_vit.spec import load_spec

runner = CliRunner()


def test_mnist_source_is_real(mnist):
    tx, ty, vx, vy = mnist
    assert tx.shape == (60000, 28, 28) and vx.shape == (10000, 28, 28) and tx.dtype == np.uint8
    # The first training and test digits of MNIST, as LeCun's files order them.
    assert list(ty[:8]) == [5, 0, 4, 1, 9, 2, 1, 3] and list(vy[:5]) == [7, 2, 1, 0, 4]
    assert tx.max() == 255 and np.bincount(ty).min() > 5000


def test_offline_digit_recognizer_build(tmp_path: Path, mnist, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "digit-recognizer", "--offline"])
    assert result.exit_code == 0, result.output
    assert "built offline from real MNIST" in result.output
    d = tmp_path / "data" / "digit-recognizer"
    train = pd.read_csv(d / "train.csv")
    assert train.shape == (42000, 785) and list(train.columns[:3]) == ["label", "pixel0", "pixel1"]
    test, sample, solution = (pd.read_csv(d / f) for f in ("test.csv", "sample_submission.csv", "solution.csv"))
    assert test.shape == (28000, 784) and "label" not in test.columns
    assert list(sample.columns) == ["ImageId", "Label"] and sample["ImageId"].tolist() == list(range(1, 28001))
    assert solution["ImageId"].tolist() == sample["ImageId"].tolist()
    # Every image keeps its real label: look a few rows up in the source by their pixels.
    tx, ty, vx, vy = mnist
    source = {img.tobytes(): y for img, y in zip(np.concatenate([tx, vx]), np.concatenate([ty, vy]))}
    pix = train.iloc[:, 1:].to_numpy(np.uint8)
    for row in (0, 1, 777, 41999):
        assert source[pix[row].tobytes()] == train["label"][row]
    tpix = test.to_numpy(np.uint8)
    for row in (0, 27999):
        assert source[tpix[row].tobytes()] == solution["Label"][row]
    # Train and test are disjoint draws covering 70,000 images.
    assert len({r.tobytes() for r in pix[:2000]} & {r.tobytes() for r in tpix[:2000]}) <= 2
    # A second run downloads nothing: it finds and validates the files.
    again = runner.invoke(app, ["data", "digit-recognizer"])
    assert again.exit_code == 0 and "found and validated" in again.output


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_new_spec_from_idx_needs_no_code(tmp_path: Path, mnist, monkeypatch):
    tx, ty, vx, vy = mnist
    idx = tmp_path / "idx"
    idx.mkdir()
    for name, arr in {"train-images-idx3-ubyte.gz": tx[:300], "train-labels-idx1-ubyte.gz": ty[:300],
                      "t10k-images-idx3-ubyte.gz": vx[:100], "t10k-labels-idx1-ubyte.gz": vy[:100]}.items():
        _write_idx(idx / name, arr)
    text = Path(load_spec("mnist").path).read_text()
    text = text.replace('name = "mnist"', 'name = "mycomp"').replace('pixel = "pixel{i}"', 'pixel = "px_{i}"')
    text = text.replace('label = "label"', 'label = "digit"').replace('id = "ImageId"', 'id = "Id"')
    text = text.replace('submission = ["ImageId", "Label"]', 'submission = ["Id", "Prediction"]').replace("id_start = 1", "id_start = 0")
    (tmp_path / "spec.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "mycomp", "--competition", "spec.toml", "--from-idx", str(idx)])
    assert result.exit_code == 0, result.output
    d = tmp_path / "data" / "mycomp"
    train = pd.read_csv(d / "train.csv")
    assert train.columns[0] == "digit" and train.columns[1] == "px_0" and len(train) == 300
    assert pd.read_csv(d / "sample_submission.csv")["Id"].tolist() == list(range(100))
    loaded = load_competition(load_spec(tmp_path / "spec.toml"), d)
    assert np.array_equal(loaded.train.images[:, 0], tx[:300]) and np.array_equal(loaded.train.labels, ty[:300])


def test_kaggle_api_used_only_with_credentials(tmp_path: Path, monkeypatch, small_spec):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert not kaggle_credentials_present()
    import kaggle_vit.data.fetch as fetch

    calls = []
    monkeypatch.setattr(fetch, "kaggle_credentials_present", lambda: True)
    monkeypatch.setattr(fetch, "download_from_kaggle", lambda spec, dest: calls.append(dest) or (_ for _ in ()).throw(RuntimeError("network")))
    monkeypatch.setattr(fetch, "load_mnist", lambda: (_ for _ in ()).throw(AssertionError("offline build used")))
    try:
        ensure_data(small_spec, tmp_path / "d")
    except RuntimeError:
        pass
    assert calls == [tmp_path / "d"]
