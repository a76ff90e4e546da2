"""How load time, private memory, run-folder bytes and training speed grow with a competition's size.

Builds synthetic `files` competitions (train/ID.png + train.csv, test/ID.png, sample_submission.csv and a
spec) of 1,000, 10,000 and 100,000 RGB 96×96 PNGs (four classes of blocky coloured noise, each class with
its own mean colour; a test set a tenth the size), and one of large JPEGs (800×600, quality 90) that the
spec shrinks to 224×224. A set already built under OUT is reused. For each set it measures:

- the first load (the .kvcache folder deleted: decode and cache build) and the cached load, as the wall
  seconds of `data.load_competition` (what `kaggle-vit data` and `cv` run) in a fresh process, imports aside;
- `cv --folds 5 --fold 1,2 --jobs 2 --epochs 1 --set patch_size=16 --quiet` (two folds, one per worker; patch 16
  keeps the CPU default model at a 6×6 grid on 96×96 images), sampling every 0.5 s the USS (Private_Clean +
  Private_Dirty), PSS and anonymous memory of the cv process and of each of its descendants
  (/proc/PID/smaps_rollup): each figure's peak. USS counts the file pages (cache, libraries) that no other
  process maps at that moment, so a worker reading the cache ahead of the other shows page cache in it;
  anonymous memory leaves every file page out;
- the run folder's bytes (regular files: when it held the most during the run, and after it; the largest file);
- the training images/s of the epoch, both folds together (foldK/history.csv);

and, once, the idle footprint: a process that imported torch, timm, albumentations and kaggle_vit.

    python benchmarks/scale.py OUT [--sets 1k,10k,100k,jpeg] [--jpeg-count 1000] [--load-only] [-- extra cv options]

`--load-only` times the loads alone, three times each (the code on PYTHONPATH: before and after a change).

Prints a header line (CPU, date, idle footprint) and one markdown row per set.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000}
CLASSES = 4
CHUNK = 1_000  # images generated at once
SAMPLE_S = 0.5
CV = ["--folds", "5", "--fold", "1,2", "--jobs", "2", "--epochs", "1", "--set", "patch_size=16", "--quiet"]
IDLE = "import torch, timm, albumentations, kaggle_vit.run.jobs; print(open('/proc/self/smaps_rollup').read())"
LOAD = ("import sys, time; from kaggle_vit.spec import load_spec; from kaggle_vit.data.layouts import load_competition; "
        "t = time.perf_counter(); load_competition(load_spec(sys.argv[1]), sys.argv[2]); print(time.perf_counter() - t)")


def spec_text(name: str, size: int, extension: str) -> str:
    """A `files` spec: ids without extension, class numbers as labels, flip augmentation as for photos."""
    return (f'name = "{name}"\nmetric = "accuracy"\n\n[files]\nlayout = "files"\ntrain = "train.csv"\n'
            f'image_extension = "{extension}"\n\n[columns]\nid = "id"\nlabel = "label"\nsubmission = ["id", "label"]\n\n'
            f'[image]\nheight = {size}\nwidth = {size}\nchannels = 3\n\n[train]\naug = "flip"\ntta_mode = "flip"\n')


def pixels(rng: np.random.Generator, labels: np.ndarray, height: int, width: int, block: int) -> np.ndarray:
    """uint8 (n, height, width, 3): the class's mean colour, plus noise in blocks of `block` pixels, plus
    pixel noise: learnable from the colour, and not as compressible as a flat image."""
    means = np.linspace(60, 190, CLASSES)[:, None] * np.array([1.0, 0.7, 1.2]) % 256
    coarse = rng.normal(0, 30, (len(labels), height // block, width // block, 3))
    image = means[labels][:, None, None, :] + coarse.repeat(block, 1).repeat(block, 2)
    image += rng.integers(-20, 21, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: Path, ids: list[str], labels: np.ndarray, shape: tuple[int, int], jpeg: bool,
                 rng: np.random.Generator) -> None:
    """Each id's image file, made CHUNK at a time; JPEGs drawn small and enlarged (smooth, as photos are)."""
    folder.mkdir(parents=True)
    height, width = shape
    for start in range(0, len(ids), CHUNK):
        part = slice(start, start + CHUNK)
        if jpeg:
            for image_id, array in zip(ids[part], pixels(rng, labels[part], height // 8, width // 8, 5)):
                Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR).save(
                    folder / f"{image_id}.jpg", quality=90)
        else:
            for image_id, array in zip(ids[part], pixels(rng, labels[part], height, width, 8)):
                Image.fromarray(array).save(folder / f"{image_id}.png", compress_level=1)


def build(root: Path, name: str, n: int, jpeg: bool) -> Path:
    """Write the competition into root/name unless its spec (written last) is there; return the spec."""
    spec = root / f"{name}.toml"
    if spec.exists():
        return spec
    data = root / name
    shutil.rmtree(data, ignore_errors=True)  # a build that was interrupted
    rng = np.random.default_rng(n)
    shape = (600, 800) if jpeg else (96, 96)
    labels, test_labels = rng.integers(0, CLASSES, n), rng.integers(0, CLASSES, max(1, n // 10))
    ids, test_ids = [f"{i:06d}" for i in range(n)], [f"t{i:06d}" for i in range(len(test_labels))]
    write_images(data / "train", ids, labels, shape, jpeg, rng)
    write_images(data / "test", test_ids, test_labels, shape, jpeg, rng)
    pd.DataFrame({"id": ids, "label": labels}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"id": test_ids, "label": 0}).to_csv(data / "sample_submission.csv", index=False)
    spec.write_text(spec_text(name, 224 if jpeg else 96, ".jpg" if jpeg else ".png"))
    return spec


def rollup(text: str) -> dict[str, int] | None:
    """USS (Private_Clean + Private_Dirty), PSS and anonymous bytes from a smaps_rollup text."""
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:] if line.endswith("kB")}
    if not fields:  # a process exiting (a zombie has no mappings)
        return None
    return {"uss": fields["Private_Clean"] + fields["Private_Dirty"], "pss": fields["Pss"], "anon": fields["Anonymous"]}


def memory(pid: int) -> dict[str, int] | None:
    """A process's memory (`rollup`), or None once it is gone."""
    try:
        return rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def folder_bytes(folder: Path) -> tuple[int, int, str]:
    """Bytes of the regular files under `folder` (links not followed), and its largest file's bytes and name."""
    total, largest, name = 0, 0, ""
    for path in folder.rglob("*") if folder.exists() else []:
        try:
            if path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                total += size
                if size > largest:
                    largest, name = size, str(path.relative_to(folder))
        except OSError:  # removed while walking (a temporary file)
            continue
    return total, largest, name


def load_seconds(spec: Path, data: Path) -> float:
    """load_competition's wall seconds in a fresh process."""
    done = subprocess.run([sys.executable, "-c", LOAD, str(spec), str(data)], capture_output=True, text=True, check=True,
                          cwd=data)  # not the caller's folder: `-c` would import a kaggle_vit found there first
    return float(done.stdout.split()[-1])


def sample(cv: subprocess.Popen, run_dir: Path) -> tuple[dict[str, int], dict[str, int], tuple[int, int, str]]:
    """Until cv ends, every SAMPLE_S: peak memory of the cv process and of its largest descendant (each
    figure's own peak), and the run folder's `folder_bytes` when it held the most."""
    parent = {"uss": 0, "pss": 0, "anon": 0}
    worker, run_peak = dict(parent), (0, 0, "")
    while cv.poll() is None:
        for pid in [cv.pid, *descendants(cv.pid)]:
            peaks = parent if pid == cv.pid else worker
            for key, value in (memory(pid) or {}).items():
                peaks[key] = max(peaks[key], value)
        run_peak = max(run_peak, folder_bytes(run_dir))
        time.sleep(SAMPLE_S)
    return parent, worker, run_peak


def run_cv(spec: Path, data: Path, run_dir: Path, extra: list[str]) -> dict:
    """cv, sampled (`sample`); its output goes to RUN.log. Then the run folder's bytes and the epoch's
    images/s, both folds together (they train at the same time)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    started = time.perf_counter()
    with open(log, "w") as fh:
        cv = subprocess.Popen([sys.executable, "-m", "kaggle_vit.cli", "cv", "-c", str(spec), "--data-dir", str(data),
                               *CV, "--run-dir", str(run_dir), *extra], stdout=fh, stderr=subprocess.STDOUT)
        parent, worker, run_peak = sample(cv, run_dir)
    if cv.returncode:
        raise SystemExit(f"cv failed ({cv.returncode}): see {log}")
    total, largest, name = folder_bytes(run_dir)
    rates = [pd.read_csv(path)["images_per_s"].iloc[0] for path in sorted(run_dir.glob("fold*/history.csv"))]
    return {"parent": parent, "worker": worker, "run_peak": max(run_peak, (total, largest, name)), "run_bytes": total,
            "largest": (largest, name), "images_per_s": float(sum(rates)), "seconds": time.perf_counter() - started}


def idle_uss() -> dict[str, int]:
    """The footprint of a process that imported what a fold worker imports."""
    return rollup(subprocess.run([sys.executable, "-c", IDLE], capture_output=True, text=True, check=True).stdout)


def cpu_name() -> str:
    """lscpu's model name."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "a CPU")


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def set_spec(out: Path, name: str, jpeg_count: int) -> tuple[Path, Path, int, str]:
    """One set built (or reused): its spec, data folder, training images and a description."""
    jpeg = name == "jpeg"
    n = jpeg_count if jpeg else SIZES[name]
    set_name = f"jpeg-{n}" if jpeg else f"png-{name}"
    what = f"{n:,} {'800×600 JPEG → 224' if jpeg else '96×96 PNG'}"
    return build(out / "sets", set_name, n, jpeg), out / "sets" / set_name, n, what


def loads(spec: Path, data: Path) -> tuple[float, float]:
    """The first load (the cache deleted) and the cached load, in seconds."""
    shutil.rmtree(data / ".kvcache", ignore_errors=True)
    return load_seconds(spec, data), load_seconds(spec, data)


def measure_loads(out: Path, name: str, jpeg_count: int, repeats: int = 3) -> str:
    """One set's loads, `repeats` times: a markdown row of each figure's runs."""
    spec, data, _, what = set_spec(out, name, jpeg_count)
    runs = [loads(spec, data) for _ in range(repeats)]
    return (f"| {what} | {', '.join(f'{first:.2f}' for first, _ in runs)} s | "
            f"{', '.join(f'{cached:.2f}' for _, cached in runs)} s |")


def measure(out: Path, name: str, jpeg_count: int, extra: list[str]) -> tuple[str, dict]:
    """One set: build (or reuse), time both loads, run cv; its markdown row and raw figures."""
    spec, data, n, what = set_spec(out, name, jpeg_count)
    first, cached = loads(spec, data)
    cache = folder_bytes(data / ".kvcache")[0]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cv = run_cv(spec, data, out / "runs" / data.name, extra)
    p, w = cv["parent"], cv["worker"]
    row = (f"| {what} | {mb(cache)} | {first:.1f} s | {cached:.2f} s | {mb(p['uss'])} / {mb(p['pss'])} ({mb(p['anon'])}) "
           f"| {mb(w['uss'])} / {mb(w['pss'])} ({mb(w['anon'])}) | {mb(cv['run_peak'][0])} ({cv['run_peak'][2]} "
           f"{mb(cv['run_peak'][1])}) / {mb(cv['run_bytes'])} ({cv['largest'][1]} {mb(cv['largest'][0])}) | {cv['images_per_s']:,.0f} |")
    return row, {"set": data.name, "n": n, "cache_bytes": cache, "first_load_s": first, "cached_load_s": cached, **cv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sets", default="1k,10k,100k,jpeg")
    parser.add_argument("--jpeg-count", type=int, default=1_000, help="training images of the JPEG set (test: a tenth as many)")
    parser.add_argument("--load-only", action="store_true", help="time the first and cached loads only, three times")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    cpu = cpu_name()
    if args.load_only:
        print(f"{cpu}, {os.cpu_count()} cores, {datetime.date.today()}\n\n| set | first load | cached load |\n| --- | --- | --- |")
        for name in args.sets.split(","):
            print(measure_loads(args.out, name, args.jpeg_count), flush=True)
        return
    idle = idle_uss()
    print(f"{cpu}, {os.cpu_count()} cores, {datetime.date.today()}; cv {' '.join(CV + extra)}; idle footprint "
          f"(torch, timm, albumentations, kaggle_vit imported): USS {mb(idle['uss'])}, PSS {mb(idle['pss'])}, "
          f"anonymous {mb(idle['anon'])}\n")
    print("| set | image cache | first load | cached load | cv parent peak USS / PSS (anon) | largest worker peak "
          "USS / PSS (anon) | run folder peak / after (largest file of each) | train images/s (2 folds) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for name in args.sets.split(","):
        row, figures = measure(args.out, name, args.jpeg_count, extra)
        results.append(figures)
        print(row, flush=True)
    (args.out / "scale.json").write_text(json.dumps({"idle": idle, "cpu": cpu, "sets": results}, indent=1))


if __name__ == "__main__":
    main()
