"""A fold checkpoint: the best epoch's weights as safetensors (tensors only: loading runs no code),
with its `CheckpointHeader` (the model's name, keywords, image size and classes) as JSON in its
header, and the tensor bytes' digest. The header is read without torch (`checkpoint_header`), so
`submit` and `report` check a run's checkpoints before any model is built, and `pretrained` weights name
their model."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..io import atomic_path
from ..records import CheckpointHeader, to_json

if TYPE_CHECKING:
    import torch

METADATA_KEY = "kaggle_vit"  # the safetensors metadata entry holding a checkpoint's JSON
MAX_HEADER = 100_000_000  # safetensors' own bound on the header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _digest(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _check_table(tensors: dict, data_bytes: int) -> None:
    """The tensor table covers the data exactly: each tensor's bytes fit its dtype and shape, end to end."""
    end = 0
    for entry in sorted(tensors.values(), key=lambda e: e["data_offsets"]):
        start, stop = entry["data_offsets"]
        if start != end or stop - start != math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]:
            raise ValueError("the tensor table does not match the data")
        end = stop
    if end != data_bytes:
        raise ValueError(f"{data_bytes} bytes of data, the tensor table gives {end}")


def checkpoint_header(path: Path) -> CheckpointHeader:
    """A fold checkpoint's header (model, keywords, image size, classes), read as JSON from its
    safetensors header without torch and without resolving anything: reading it runs no code. The
    tensor table is checked against the file, and the tensor bytes against their digest, so a
    truncated or damaged file is refused here as loading it would refuse it."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        length = int.from_bytes(fh.read(8), "little")
        if not 2 <= length <= min(size - 8, MAX_HEADER):
            raise ValueError("not a safetensors file")
        table = json.loads(fh.read(length))
        meta = json.loads(table.pop("__metadata__")[METADATA_KEY])
        header = CheckpointHeader.from_json(meta)
        _check_table(table, size - 8 - length)
        if _digest(iter(lambda: fh.read(1 << 20), b"")) != meta["sha256"]:
            raise ValueError("the tensor bytes do not match their digest")
    return header


def save_checkpoint(path: Path, state_dict: "dict[str, torch.Tensor]", header: CheckpointHeader) -> None:
    """Write a fold's best weights as safetensors (tensors only: no code), with `header` and the
    tensor bytes' digest as JSON in its safetensors header."""
    from safetensors.torch import save  # lazy: torch only to write weights; the header reads without it

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    bare = save(tensors)  # the data section does not depend on the metadata: its digest is the file's
    digest = _digest([memoryview(bare)[8 + int.from_bytes(bare[:8], "little"):]])
    del bare
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps({**to_json(header), "sha256": digest})}))
