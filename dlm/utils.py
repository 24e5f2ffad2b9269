"""The small helpers dlm's entry points share, one copy each: dtype names, atomic writes of
results and plots, and seeds derived from integers. Importing this module imports nothing heavy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """``torch.float32`` / ``bfloat16`` / ``float16`` from its name; another name is a ValueError
    listing these."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed over it: a reader (or a crash)
    never sees half a file. Missing parent directories are created."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, record: Any, indent: int | None = 2) -> Path:
    """``record`` as JSON at ``path``, atomically (values JSON cannot hold are written as strings)."""
    return write_atomic(path, json.dumps(record, indent=indent, default=str) + "\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically, then close it."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def seed_of(*parts: int | tuple) -> int:
    """A non-negative 63-bit seed from integers (or tuples of them): the same in every process and
    run, since tuples of ints hash without Python's per-process string salt."""

    def ints_only(part) -> bool:
        return isinstance(part, int) or (isinstance(part, tuple) and all(map(ints_only, part)))

    if not all(map(ints_only, parts)):
        raise TypeError(f"seed_of takes integers only (strings hash differently in every process): {parts!r}")
    return hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF
