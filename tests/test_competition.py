from pathlib import Path

import pytest

from kaggle_vit.errors import KaggleVitError
from kaggle_vit.spec import list_competitions, load_spec


def test_bundled_specs_describe_kaggle_layout():
    assert {"digit-recognizer", "mnist"} <= set(list_competitions())
    spec = load_spec("digit-recognizer")
    assert (spec.offline_n_train, spec.offline_n_test) == (42000, 28000)
    assert spec.submission_columns == ("ImageId", "Label") and spec.id_start == 1
    assert spec.pixel_columns[:2] == ["pixel0", "pixel1"] and len(spec.pixel_columns) == 784
    assert spec.patch_sizes() == [2, 4, 7, 14]
    assert load_spec("mnist").offline_split == "official"


def test_spec_from_path_and_missing_key(tmp_path: Path):
    text = Path(load_spec("mnist").path).read_text().replace('name = "mnist"', 'name = "mine"')
    (tmp_path / "mine.toml").write_text(text)
    assert load_spec(tmp_path / "mine.toml").name == "mine"
    (tmp_path / "bad.toml").write_text(text.replace("height = 28\n", ""))
    with pytest.raises(KaggleVitError, match=r"bad.toml \[image\]: missing key 'height'"):
        load_spec(tmp_path / "bad.toml")
    with pytest.raises(KaggleVitError, match="unknown competition 'nope'"):
        load_spec("nope")
