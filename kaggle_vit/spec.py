"""Competition specs: one TOML file per competition, loaded into a frozen dataclass. A spec means
what it says: an unknown key, a value of the wrong type or out of bounds, or a path leaving the
competition folder is one line naming the file, the table and the key."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .config import check_settings
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
    class_names: tuple[str, ...]  # the classes as plots and tables show them ([classes] names, else the labels)
    # The classes as the competition's files spell them, in class order: what the training labels,
    # submissions and solution files hold (a pixel CSV's class numbers; a labels CSV's or the class
    # folders' text). Empty until an image-file competition's training labels name them.
    class_labels: tuple[str, ...] = ()
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
        """The submission's columns: id and label or probability, or id and one column per class label."""
        if self.submission_form == "class_probabilities":
            return [self.submission_columns[0], *self.class_labels]
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

    def with_labels(self, found: tuple[str, ...], source: Path) -> CompetitionSpec:
        """The spec with the class labels of an image-file competition, from its training labels
        (`found`, sorted, read from `source`) unless [classes] labels gave them. Names that spell the
        training labels are the labels, in their order (a label that is not one is refused by its row);
        names of class numbers only show them. A class count [classes] disagrees with is refused."""
        if self.class_labels:
            return self
        names = self.class_names
        numbers = all(label.lstrip("-").isdigit() for label in found)
        if names and (set(found) <= set(names) or not numbers):
            return replace(self, class_labels=names)
        if self.num_classes and len(found) != self.num_classes:
            raise KaggleVitError(f"{source}: the training labels hold {len(found)} classes ({shown(found)}), but "
                                 f"{self.path} [classes] has {self.num_classes}")
        return replace(self, class_labels=found, class_names=names or found, num_classes=len(found))


@dataclass(frozen=True)
class SpecFacts:
    """What a spec says about a competition, as `data` shows it after loading the files."""

    layout: str
    metric: str
    higher_is_better: bool
    submission_form: str
    submission_header: tuple[str, ...]
    classes: tuple[tuple[str, str], ...]  # (label as written in submissions, name as shown), in class order
    image: tuple[int, int, int]  # channels, height, width
    patch_sizes: tuple[int, ...]
    train_defaults: tuple[tuple[str, object], ...]


def spec_facts(spec: CompetitionSpec) -> SpecFacts:
    """The facts `data` ends with, so a spec writer sees what kaggle-vit understood."""
    return SpecFacts(spec.layout, spec.metric, METRICS[spec.metric].higher_is_better, spec.submission_form,
                     tuple(spec.submission_header()), tuple(zip(spec.class_labels, spec.class_names)),
                     (spec.channels, spec.height, spec.width),
                     tuple(spec.patch_sizes(limit=min(32, spec.height // 2, spec.width // 2))), spec.train_defaults)


def shown(values: tuple[str, ...] | list[str], first: int = 5) -> str:
    """The first few of many values, for a message."""
    return ", ".join(values[:first]) + (", ..." if len(values) > first else "")


def bundled_dir() -> Path:
    """Bundled specs: inside the installed package, or the checkout's top-level competitions/."""
    here = Path(__file__).resolve().parent
    installed = here / "competitions"
    return installed if any(installed.glob("*.toml")) else here.parent / "competitions"


def list_competitions() -> list[str]:
    """Names of the competitions shipped with the package."""
    return sorted(p.stem for p in bundled_dir().glob("*.toml"))


def is_bundled(spec: CompetitionSpec) -> bool:
    """Whether the package ships this spec: commands then name it alone, others need `-c PATH`."""
    return bool(spec.path) and Path(spec.path).resolve() == (bundled_dir() / f"{spec.name}.toml").resolve()


SPLITS = ("official", "resplit")
LAYOUTS = ("pixels", "files", "folders")
FORMS = ("label", "probability", "class_probabilities")
# The keys of each table ("": the top level); [train] takes TrainConfig's (config.check_settings).
KEYS = {
    "": ("name", "title", "slug", "url", "metric", "submission_form",
         "files", "columns", "image", "classes", "offline", "train"),
    "files": ("layout", "train", "test", "sample_submission", "solution", "train_images", "test_images",
              "image_extension"),
    "columns": ("id", "label", "pixel", "pixel_start", "id_start", "submission"),
    "image": ("height", "width", "channels"),
    "classes": ("num_classes", "labels", "names"),
    "offline": ("source", "split", "n_train", "n_test", "seed"),
}
# Bounds no real competition reaches, which keep a typo from asking for terabytes: a side of
# 4096 pixels (images are resized to the spec's size), and a pixel CSV of 512x512 RGBA images.
MAX_SIDE = 4096
MAX_PIXEL_COLUMNS = 512 * 512 * 4
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _where(path: str, table: str) -> str:
    return f"{path} [{table}]" if table else path


def _known_keys(table: dict, name: str, path: str) -> None:
    """Refuse a key the spec does not know: a misspelt one would otherwise be silently ignored."""
    known = KEYS[name]
    for key, value in table.items():
        if key not in known:
            kind, spell = ("table", "[{}]") if not name and isinstance(value, dict) else ("key", "'{}'")
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {spell.format(close[0])}?" if close else f"known: {', '.join(known)}"
            raise KaggleVitError(f"{_where(path, name)}: unknown {kind} {spell.format(key)}; {hint}")


def _need(table: dict, key: str, where: str) -> object:
    if key not in table:
        raise KaggleVitError(f"{where}: missing key '{key}'")
    return table[key]


def _table(data: dict, key: str, path: str, required: bool = True) -> dict:
    value = _need(data, key, path) if required else data.get(key, {})
    if not isinstance(value, dict):
        raise KaggleVitError(f"{path}: '{key}' must be a table ([{key}])")
    if key in KEYS:
        _known_keys(value, key, path)
    return value


def _int(table: dict, key: str, where: str, default: int | None = None, low: int | None = None,
         high: int | None = None) -> int:
    """An integer setting of the spec, checked when the spec is loaded, not when it is used."""
    value = _need(table, key, where) if default is None else table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KaggleVitError(f"{where}: {key} = {value!r} must be an integer")
    if low is not None and value < low:
        raise KaggleVitError(f"{where}: {key} = {value} must be at least {low}")
    if high is not None and value > high:
        raise KaggleVitError(f"{where}: {key} = {value} must be at most {high}")
    return value


def _str(table: dict, key: str, where: str, default: str | None = None) -> str:
    value = _need(table, key, where) if default is None else table.get(key, default)
    if not isinstance(value, str):
        raise KaggleVitError(f"{where}: {key} = {value!r} must be a string")
    return value


def _strings(table: dict, key: str, where: str) -> tuple[str, ...] | None:
    """A list of strings (integers are taken as written), or None when the key is absent."""
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in value):
        raise KaggleVitError(f"{where}: {key} = {value!r} must be a list of strings")
    return tuple(str(v) for v in value)


def _folder_name(data: dict, key: str, path: str, default: str | None = None) -> str:
    """A name that becomes a folder or file name (data/NAME, runs/NAME, SLUG.zip): a plain one,
    so that no spec sends a command's reads or writes outside those folders."""
    value = _need(data, key, path) if default is None else data.get(key, default)
    if not isinstance(value, str) or not FOLDER_NAME.fullmatch(value) or ".." in value:
        raise KaggleVitError(f"{path}: {key} = {value!r} must be a plain name: letters, digits, '.', '_' and '-', "
                             f"starting with a letter or digit, without '..'")
    return value


def is_inside(value: str) -> bool:
    """Whether a spec path stays inside the competition folder: relative, not empty, without '..'
    (reading or building a competition never touches a file outside its folder)."""
    parts = re.split(r"[\\/]", value)
    return bool(value.strip()) and not value.startswith(("/", "\\", "~")) and not re.match(r"[A-Za-z]:", value) \
        and ".." not in parts


def _inside(files: dict, key: str, where: str, default: str) -> str:
    """A [files] path, checked by `is_inside`."""
    value = _str(files, key, where, default)
    if not is_inside(value):
        raise KaggleVitError(f"{where}: {key} = {value!r} must be a path inside the competition folder "
                             f"(relative, without '..')")
    return value


def _classes(classes: dict, where: str, layout: str) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
    """(num_classes, labels, names) from [classes]. The labels are the classes as the competition's
    files spell them, and what submissions write: a pixel CSV's class numbers 0..N-1, else `labels`,
    else () for the training labels to tell (`CompetitionSpec.with_labels`). `names` show the classes
    in plots and tables (default: the labels)."""
    labels, names = _strings(classes, "labels", where), _strings(classes, "names", where)
    given = labels if labels is not None else names
    if given is None and "num_classes" not in classes and layout != "pixels":
        return 0, (), ()
    count = _int(classes, "num_classes", where, default=len(given) if given is not None else None, low=2)
    for key, values in (("labels", labels), ("names", names)):
        if values is not None and len(values) != count:
            raise KaggleVitError(f"{where}: {len(values)} {key} for num_classes = {count}")
        twice = [v for i, v in enumerate(values or ()) if v in values[:i]]
        if twice:
            raise KaggleVitError(f"{where}: {key} holds '{twice[0]}' twice")
    if layout == "pixels":
        numbers = tuple(str(i) for i in range(count))
        if labels is not None and labels != numbers:
            raise KaggleVitError(f"{where}: labels = [{shown(labels, 3)}]: a pixel CSV's labels are the class numbers "
                                 f"0..{count - 1}, and submissions write them so; leave labels out and give names "
                                 f"to show the classes by name")
        labels = numbers
    labels = labels or ()
    return count, labels, names or labels


def _image(image: dict, where: str, layout: str) -> tuple[int, int, int]:
    """(height, width, channels), bounded: a typo must not ask for an image cache of terabytes."""
    height, width = (_int(image, key, where, low=1, high=MAX_SIDE) for key in ("height", "width"))
    channels = _int(image, "channels", where, default=1, low=1)
    if layout == "pixels" and channels not in (1, 3, 4):
        raise KaggleVitError(f"{where}: channels = {channels} must be 1 (grey), 3 (RGB) or 4 (RGBA)")
    if layout != "pixels" and channels not in (1, 3):
        raise KaggleVitError(f"{where}: channels = {channels} must be 1 (grey) or 3 (RGB) for image files")
    if layout == "pixels" and height * width * channels > MAX_PIXEL_COLUMNS:
        raise KaggleVitError(f"{where}: {height}x{width}x{channels} makes {height * width * channels:,} pixel columns; "
                             f"a pixel CSV holds at most {MAX_PIXEL_COLUMNS:,} (512x512x4)")
    return height, width, channels


def _pixel_pattern(pattern: str, where: str) -> str:
    """The pixel column pattern: the pixel number as {i} (a format such as {i:03d} too), no other braces."""
    try:
        varies = pattern.format(i=0) != pattern.format(i=1)
    except (KeyError, IndexError, ValueError):
        varies = False
    if not varies:
        raise KaggleVitError(f"{where}: pixel = '{pattern}' must contain {{i}}, the pixel number, and no other "
                             f"braces (write {{{{ or }}}} for a brace in a column name)")
    return pattern


def _submission(cols: dict, where: str, form: str) -> tuple[str, ...]:
    submission = _strings(cols, "submission", where)
    if submission is None:
        raise KaggleVitError(f"{where}: missing key 'submission'")
    if form == "class_probabilities" and len(submission) != 1:
        raise KaggleVitError(f"{where}: submission must name the id column alone (the class columns follow "
                             f"from the class labels) when submission_form = 'class_probabilities'")
    if form != "class_probabilities" and len(submission) != 2:
        raise KaggleVitError(f"{where}: submission must name two columns (id, {form})")
    return submission


def _choice(table: dict, key: str, where: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(table, key, where, default)
    if value not in choices:
        raise KaggleVitError(f"{where}: {key} = '{value}' must be one of {', '.join(choices)}")
    return value


def parse_spec(data: dict, path: str) -> CompetitionSpec:
    """Turn a parsed TOML table into a spec, checking every key and value (the [train] settings
    too) and naming the file, table and key on error."""
    _known_keys(data, "", path)
    files, cols, image = (_table(data, key, path) for key in ("files", "columns", "image"))
    wf, wc = f"{path} [files]", f"{path} [columns]"
    layout = _choice(files, "layout", wf, "pixels", LAYOUTS)
    form = _choice(data, "submission_form", path, "label", FORMS)
    classes = _table(data, "classes", path, required=layout == "pixels")
    offline = _table(data, "offline", path, required=False)
    train = _table(data, "train", path, required=False)
    check_settings(train, f"{path} [train]")
    num_classes, labels, names = _classes(classes, f"{path} [classes]", layout)
    submission = _submission(cols, wc, form)
    height, width, channels = _image(image, f"{path} [image]", layout)
    name = _folder_name(data, "name", path)
    metric = _str(data, "metric", path, "accuracy")
    if metric not in METRICS:
        raise KaggleVitError(f"{path}: metric = '{metric}' is not known (known: {', '.join(METRICS)})")
    source = _choice(offline, "source", f"{path} [offline]", "mnist" if layout == "pixels" else "none", ("mnist", "none"))
    if source == "mnist" and layout != "pixels":
        raise KaggleVitError(f"{path} [offline]: source = 'mnist' builds pixel CSVs; a '{layout}' competition has no "
                             f"offline build (source = 'none')")
    extension = _str(files, "image_extension", wf, "")
    if extension and not re.fullmatch(r"\.[A-Za-z0-9]+", extension):
        raise KaggleVitError(f"{wf}: image_extension = '{extension}' must be empty or an extension such as '.png'")
    spec = CompetitionSpec(
        name=name,
        title=_str(data, "title", path, name),
        slug=_folder_name(data, "slug", path, name),
        url=_str(data, "url", path, ""),
        metric=metric,
        train_file=_inside(files, "train", wf, "train.csv"),
        test_file=_inside(files, "test", wf, "test.csv"),
        sample_submission_file=_inside(files, "sample_submission", wf, "sample_submission.csv"),
        solution_file=_inside(files, "solution", wf, "solution.csv"),
        label_column=_str(cols, "label", wc, "label"),
        pixel_column=_pixel_pattern(_str(cols, "pixel", wc, "pixel{i}"), wc),
        id_column=_str(cols, "id", wc, submission[0]),
        id_start=_int(cols, "id_start", wc, default=1, low=-(2**62), high=2**62),
        submission_columns=submission,
        height=height,
        width=width,
        channels=channels,
        num_classes=num_classes,
        class_names=names,
        class_labels=labels,
        offline_source=source,
        offline_split=_choice(offline, "split", f"{path} [offline]", "official", SPLITS),
        offline_n_train=_int(offline, "n_train", f"{path} [offline]", default=0, low=0),
        offline_n_test=_int(offline, "n_test", f"{path} [offline]", default=0, low=0),
        offline_seed=_int(offline, "seed", f"{path} [offline]", default=0, low=0),
        path=path,
        layout=layout,
        train_images=_inside(files, "train_images", wf, "train"),
        test_images=_inside(files, "test_images", wf, "test"),
        image_extension=extension,
        pixel_start=_int(cols, "pixel_start", wc, default=0, low=0, high=2**62),
        train_defaults=tuple(sorted(train.items())),
        submission_form=form,
    )
    if METRICS[metric].binary_only and num_classes not in (0, 2):
        raise KaggleVitError(f"{path}: metric = '{metric}' scores two classes, but num_classes = {num_classes}")
    if form == "probability" and num_classes not in (0, 2):
        raise KaggleVitError(f"{path}: submission_form = 'probability' is for two classes, but num_classes = {num_classes}")
    return spec


def load_spec(name_or_path: str | Path) -> CompetitionSpec:
    """Load a bundled competition by name, or any spec by the path of its TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        path = candidate
    else:
        path = bundled_dir() / f"{name_or_path}.toml"
        if not path.exists():
            known = ", ".join(list_competitions())
            raise KaggleVitError(f"unknown competition '{name_or_path}' (bundled: {known}; or give a path to a spec .toml)")
    return parse_spec(read_toml(path, "competition spec"), str(path))
