"""Atomic file writes: a crash or a kill never leaves a half-written file behind."""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import KaggleVitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# This machine's name as files written by its processes carry it: .NAME.kvPID@HOST.RANDOM.tmp, a
# temporary file, says who writes it, so a later run can tell a killed writer's leftover (its
# process gone) from a file still being written, and a run folder shared by several machines
# tells whose process a fold's claim or a staging folder is
HOST = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\..+\.kv(\d+)@([A-Za-z0-9-]*)\.[^.]+\.tmp$")


def is_running(pid: int) -> bool:
    """Whether a process of this machine is alive (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def _remove_orphans(folder: Path) -> None:
    """Remove the temporary files that killed writers of this machine left in `folder`."""
    for entry in os.scandir(folder):
        match = _TEMP.match(entry.name)
        if match and match[2] == HOST and not is_running(int(match[1])) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename. An error
    names `path`, not the temporary file (a full disk, a read-only folder, a folder in the way)."""
    path = Path(path)
    prefix = f".{path.name}.kv{os.getpid()}@{HOST}."
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path.parent)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as error:
        ours = error.filename is None or os.path.basename(str(error.filename)).startswith(prefix)
        if ours and error.errno is not None:  # a write of the temporary file, or its rename
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def size_text(n_bytes: float) -> str:
    """A byte count as people read it: 331 KB, 300 MB, 20.7 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= 0.9995 * scale:  # 999.7 MB reads as 1 GB, never as 1e+03 MB
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} bytes"


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_new(path: str | os.PathLike[str], text: str) -> bool:
    """Create `path` holding `text` unless it exists (O_EXCL: of two processes, one creates it);
    False when it exists. Not atomic: a process killed while writing leaves a short file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return True


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_toml(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file, text that is not UTF-8 (as TOML must be) or bad syntax is
    one KaggleVitError line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise KaggleVitError(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise KaggleVitError(f"{path}: line {line}: byte 0x{raw[error.start]:02x} is not UTF-8 text; save the file "
                             f"as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise KaggleVitError(f"{path}: invalid TOML: {error}") from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
