"""Competition specs: one TOML file per competition, loaded into a frozen dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import KaggleVitError
from .io import read_toml


@dataclass(frozen=True)
class CompetitionSpec:
    """Everything the toolkit needs to know about one image-classification competition."""

    name: str
    title: str
    slug: str
    url: str
    metric: str
    train_file: str
    test_file: str
    sample_submission_file: str
    solution_file: str
    label_column: str
    pixel_column: str
    id_column: str
    id_start: int
    submission_columns: tuple[str, ...]
    height: int
    width: int
    channels: int
    num_classes: int
    class_names: tuple[str, ...]
    offline_source: str = "mnist"
    offline_split: str = "official"
    offline_n_train: int = 0
    offline_n_test: int = 0
    offline_seed: int = 0
    path: str = ""

    @property
    def n_pixels(self) -> int:
        """Pixel columns per row: H × W × C."""
        return self.height * self.width * self.channels

    @property
    def pixel_columns(self) -> list[str]:
        """Names of the pixel columns in file order (channel-last, row-major, as Kaggle flattens)."""
        return [self.pixel_column.format(i=i) for i in range(self.n_pixels)]

    @property
    def prediction_column(self) -> str:
        """The submission column holding the predicted label."""
        return self.submission_columns[1]

    def patch_sizes(self, limit: int = 14) -> list[int]:
        """Patch sizes that tile the image exactly (timm drops border pixels otherwise)."""
        return [p for p in range(2, limit + 1) if self.height % p == 0 and self.width % p == 0]


def _bundled_dir() -> Path:
    """Bundled specs: inside the installed package, or the checkout's top-level competitions/."""
    here = Path(__file__).resolve().parent
    installed = here / "competitions"
    return installed if any(installed.glob("*.toml")) else here.parent / "competitions"


def list_competitions() -> list[str]:
    """Names of the competitions shipped with the package."""
    return sorted(p.stem for p in _bundled_dir().glob("*.toml"))


def _need(table: dict, key: str, where: str) -> object:
    if key not in table:
        raise KaggleVitError(f"{where}: missing key '{key}'")
    return table[key]


def parse_spec(data: dict, path: str) -> CompetitionSpec:
    """Turn a parsed TOML table into a spec, naming the missing key on error."""
    files, cols = _need(data, "files", path), _need(data, "columns", path)
    image, classes = _need(data, "image", path), _need(data, "classes", path)
    offline = data.get("offline", {})
    num_classes = int(_need(classes, "num_classes", f"{path} [classes]"))
    names = tuple(str(n) for n in classes.get("names", [str(i) for i in range(num_classes)]))
    if len(names) != num_classes:
        raise KaggleVitError(f"{path} [classes]: {len(names)} names for num_classes = {num_classes}")
    submission = tuple(_need(cols, "submission", f"{path} [columns]"))
    if len(submission) != 2:
        raise KaggleVitError(f"{path} [columns]: submission must name two columns (id, label)")
    name = str(_need(data, "name", path))
    return CompetitionSpec(
        name=name,
        title=str(data.get("title", name)),
        slug=str(data.get("slug", name)),
        url=str(data.get("url", "")),
        metric=str(data.get("metric", "accuracy")),
        train_file=str(files.get("train", "train.csv")),
        test_file=str(files.get("test", "test.csv")),
        sample_submission_file=str(files.get("sample_submission", "sample_submission.csv")),
        solution_file=str(files.get("solution", "solution.csv")),
        label_column=str(cols.get("label", "label")),
        pixel_column=str(cols.get("pixel", "pixel{i}")),
        id_column=str(cols.get("id", submission[0])),
        id_start=int(cols.get("id_start", 1)),
        submission_columns=submission,
        height=int(_need(image, "height", f"{path} [image]")),
        width=int(_need(image, "width", f"{path} [image]")),
        channels=int(image.get("channels", 1)),
        num_classes=num_classes,
        class_names=names,
        offline_source=str(offline.get("source", "mnist")),
        offline_split=str(offline.get("split", "official")),
        offline_n_train=int(offline.get("n_train", 0)),
        offline_n_test=int(offline.get("n_test", 0)),
        offline_seed=int(offline.get("seed", 0)),
        path=path,
    )


def load_spec(name_or_path: str | Path) -> CompetitionSpec:
    """Load a bundled competition by name, or any spec by the path of its TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        path = candidate
    else:
        path = _bundled_dir() / f"{name_or_path}.toml"
        if not path.exists():
            known = ", ".join(list_competitions())
            raise KaggleVitError(f"unknown competition '{name_or_path}' (bundled: {known}; or give a path to a spec .toml)")
    return parse_spec(read_toml(path, "competition spec"), str(path))
