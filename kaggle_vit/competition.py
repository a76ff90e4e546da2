"""Competition specs: one TOML file per competition, loaded into a frozen dataclass."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import KaggleVitError
from .io import read_toml
from .metrics import METRICS


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
    layout: str = "pixels"  # pixels (pixel CSVs) | files (labels CSV + image folder) | folders (one per class)
    train_images: str = "train"
    test_images: str = "test"
    image_extension: str = ""  # added to ids without one; "" tries .png, .jpg, .jpeg, .bmp, .tif, .tiff
    pixel_start: int = 0  # number of the first pixel column (Fashion-MNIST's CSVs start at pixel1)
    train_defaults: tuple[tuple[str, object], ...] = ()  # [train]: TrainConfig settings for this competition
    submission_form: str = "label"  # label | probability (of the second class) | class_probabilities

    @property
    def n_pixels(self) -> int:
        """Pixel columns per row: H × W × C."""
        return self.height * self.width * self.channels

    @property
    def pixel_columns(self) -> list[str]:
        """Names of the pixel columns in file order (channel-last, row-major, as Kaggle flattens)."""
        return [self.pixel_column.format(i=i + self.pixel_start) for i in range(self.n_pixels)]

    def submission_header(self) -> list[str]:
        """The submission's columns: id and label or probability, or id and one column per class."""
        if self.submission_form == "class_probabilities":
            return [self.submission_columns[0], *self.class_names]
        return list(self.submission_columns)

    @property
    def solution_columns(self) -> tuple[str, str]:
        """A solution file's columns: the submission's id, and the true label (the submission's
        second column, or the training file's label column when there is one column per class)."""
        if len(self.submission_columns) == 2:
            return self.submission_columns[0], self.submission_columns[1]
        return self.submission_columns[0], self.label_column

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


def _table(data: dict, key: str, path: str, required: bool = True) -> dict:
    value = _need(data, key, path) if required else data.get(key, {})
    if not isinstance(value, dict):
        raise KaggleVitError(f"{path}: '{key}' must be a table ([{key}])")
    return value


def _int(table: dict, key: str, where: str, default: int | None = None, low: int | None = None) -> int:
    """An integer setting of the spec, checked when the spec is loaded, not when it is used."""
    value = _need(table, key, where) if default is None else table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KaggleVitError(f"{where}: {key} = {value!r} must be an integer")
    if low is not None and value < low:
        raise KaggleVitError(f"{where}: {key} = {value} must be at least {low}")
    return value


SPLITS = ("official", "resplit")
LAYOUTS = ("pixels", "files", "folders")
FORMS = ("label", "probability", "class_probabilities")


def _classes(classes: dict, where: str, required: bool) -> tuple[int, tuple[str, ...]]:
    """(num_classes, names) from [classes]; (0, ()) when the training labels are to name them."""
    if "names" in classes:
        names = tuple(str(n) for n in classes["names"])
        count = _int(classes, "num_classes", where, default=len(names), low=2)
        if len(names) != count:
            raise KaggleVitError(f"{where}: {len(names)} names for num_classes = {count}")
        if len(set(names)) != len(names):
            raise KaggleVitError(f"{where}: names repeat a class")
        return count, names
    if "num_classes" in classes or required:
        count = _int(classes, "num_classes", where, low=2)
        return count, tuple(str(i) for i in range(count))
    return 0, ()


def _check_choices(path: str, metric: str, split: str, pixel: str) -> None:
    if metric not in METRICS:
        raise KaggleVitError(f"{path}: metric = '{metric}' is not known (known: {', '.join(METRICS)})")
    if split not in SPLITS:
        raise KaggleVitError(f"{path} [offline]: split = '{split}' must be one of {', '.join(SPLITS)}")
    if "{i}" not in pixel:
        raise KaggleVitError(f"{path} [columns]: pixel = '{pixel}' must contain {{i}}, the pixel number")


def parse_spec(data: dict, path: str) -> CompetitionSpec:
    """Turn a parsed TOML table into a spec, checking every value and naming the key on error."""
    files, cols = _table(data, "files", path), _table(data, "columns", path)
    layout = str(files.get("layout", "pixels"))
    if layout not in LAYOUTS:
        raise KaggleVitError(f"{path} [files]: layout = '{layout}' must be one of {', '.join(LAYOUTS)}")
    image = _table(data, "image", path)
    classes = _table(data, "classes", path, required=layout == "pixels")
    offline = _table(data, "offline", path, required=False)
    num_classes, names = _classes(classes, f"{path} [classes]", required=layout == "pixels")
    submission = tuple(str(c) for c in _need(cols, "submission", f"{path} [columns]"))
    form = str(data.get("submission_form", "label"))
    if form not in FORMS:
        raise KaggleVitError(f"{path}: submission_form = '{form}' must be one of {', '.join(FORMS)}")
    if form == "class_probabilities" and len(submission) != 1:
        raise KaggleVitError(f"{path} [columns]: submission must name the id column alone (the class columns follow "
                             f"from the class names) when submission_form = 'class_probabilities'")
    if form != "class_probabilities" and len(submission) != 2:
        raise KaggleVitError(f"{path} [columns]: submission must name two columns (id, {form})")
    name = str(_need(data, "name", path))
    spec = CompetitionSpec(
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
        id_start=_int(cols, "id_start", f"{path} [columns]", default=1),
        submission_columns=submission,
        height=_int(image, "height", f"{path} [image]", low=1),
        width=_int(image, "width", f"{path} [image]", low=1),
        channels=_int(image, "channels", f"{path} [image]", default=1, low=1),
        num_classes=num_classes,
        class_names=names,
        offline_source=str(offline.get("source", "mnist" if layout == "pixels" else "")),
        offline_split=str(offline.get("split", "official")),
        offline_n_train=_int(offline, "n_train", f"{path} [offline]", default=0, low=0),
        offline_n_test=_int(offline, "n_test", f"{path} [offline]", default=0, low=0),
        offline_seed=_int(offline, "seed", f"{path} [offline]", default=0),
        path=path,
        layout=layout,
        train_images=str(files.get("train_images", "train")),
        test_images=str(files.get("test_images", "test")),
        image_extension=str(files.get("image_extension", "")),
        pixel_start=_int(cols, "pixel_start", f"{path} [columns]", default=0, low=0),
        train_defaults=tuple(sorted(_table(data, "train", path, required=False).items())),
        submission_form=form,
    )
    _check_choices(path, spec.metric, spec.offline_split, spec.pixel_column)
    if METRICS[spec.metric].binary_only and spec.num_classes not in (0, 2):
        raise KaggleVitError(f"{path}: metric = '{spec.metric}' scores two classes, but num_classes = {spec.num_classes}")
    if form == "probability" and spec.num_classes not in (0, 2):
        raise KaggleVitError(f"{path}: submission_form = 'probability' is for two classes, but num_classes = {spec.num_classes}")
    if layout != "pixels" and spec.channels not in (1, 3):
        raise KaggleVitError(f"{path} [image]: channels = {spec.channels} must be 1 (grey) or 3 (RGB) for image files")
    return spec


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
