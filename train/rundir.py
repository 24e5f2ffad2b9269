"""A training run's directory, kept safe to resume into.

* **Identity.** Every checkpoint records the recipe keys that make a run the run it is (objective,
  seed, model shape, attention, tokenizer, data, noise, global batch). ``train.resume=auto`` refuses a
  recipe whose identity differs from the newest checkpoint's, naming the differing keys and the fix
  (another ``train.output_dir``); nothing in the directory is touched. Settings a resumed run may
  change (``optim.*``, a higher ``train.max_steps``, logging and saving cadence) are not identity.
* **One run at a time.** The main process holds an exclusive ``flock`` on ``output_dir/.lock`` for
  its lifetime (released by the kernel when the process dies, so a killed run never leaves a stale
  lock); a second run into the directory is refused.
* **Checkpoints that do not load are not used.** Before resuming, the newest checkpoint's files are
  checked without unpickling anything (safetensors headers against their sizes, zip CRCs of torch
  files, JSON, the expected files present); a broken one is reported, renamed
  ``broken-checkpoint-<step>`` (never deleted) and the previous complete checkpoint is used.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import zipfile
from pathlib import Path
from typing import Any

from dlm.config import ConfigError, to_dict

LOCK = ".lock"

#: recipe keys a resumed run may change (everything else is the run's identity)
MUTABLE = (
    "optim.",
    "train.max_steps",
    "train.eval_every",
    "train.eval_batch_size",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.resume",
    "data.num_proc",
    "train.trackers",
    "train.plot",
    "train.num_threads",
    "train.mixed_precision",
    "train.output_dir",
    "sample.",
    "model.gradient_checkpointing",
    "model.attn_backend",
    # RL: evaluation, logging and batching of the row forwards
    "rl.eval_every",
    "rl.eval_prompts",
    "rl.save_rollouts_every",
    "rl.row_batch_size",
    "rl.gradient_checkpointing",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not name.endswith(("task_args", "schedule_args")):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity(cfg, global_batch: int, engine: str = "no") -> dict[str, Any]:
    """The recipe keys that define a run (dotted), plus the global batch it trains with (the
    batches and noise of step s are functions of the seed, s and the global batch) and the engine
    (sharded engines write other checkpoint formats; one process and DDP share theirs)."""
    keys = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith(MUTABLE)}
    keys["global_batch"] = global_batch
    keys["engine"] = engine if engine not in ("no", "ddp") else "whole"
    return json.loads(json.dumps(keys, default=str))  # as it reads back from JSON


def identity_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every identity key that differs."""
    changes = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "(unset)"), current.get(key, "(unset)")
        if old != new:
            changes.append(f"{key}: {old!r} → {new!r}")
    return changes


class RunLock:
    """An exclusive advisory lock on ``output_dir/.lock`` for the life of this process."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"cannot write to train.output_dir={str(self.path.parent)!r} ({exc.strerror}); "
                "choose a writable train.output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"train.output_dir={str(self.path.parent)!r} is in use by another run ({holder}); wait for it to "
                "finish or choose another train.output_dir (nothing was changed)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --- checking a checkpoint without loading it ----------------------------------------------------


def _safetensors_ok(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "shorter than its header"
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return "header runs past the end of the file"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "header is not valid JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"is {size} bytes, its header describes {8 + n + end} (truncated?)"
    return None


def _torch_file_ok(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"is not a readable torch file ({exc})"
    return None if bad is None else f"has a corrupt record {bad!r}"


def checkpoint_problem(path: Path, expected: list[str]) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from, or None. Reads every file's integrity
    (sizes, CRCs, JSON) but deserialises nothing."""
    for name in expected:
        if (path / name).exists():
            continue
        index = path / f"{name}.index.json"  # weights sharded in several files
        if not index.is_file():
            return f"{name} is missing"
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return f"{index.name} is not a safetensors index"
        lost = sorted(s for s in shards if not (path / s).is_file())
        if lost:
            return f"{lost[0]} (named by {index.name}) is missing"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if file.suffix == ".safetensors":
            why = _safetensors_ok(file)
        elif file.suffix in (".bin", ".pt", ".pth", ".pkl"):
            why = _torch_file_ok(file)
        elif file.suffix == ".json":
            try:
                json.loads(file.read_text())
                why = None
            except (ValueError, UnicodeDecodeError):
                why = "is not valid JSON"
        else:
            continue
        if why:
            return f"{rel} {why}"
    return None


def set_aside(path: Path) -> Path:
    """Rename a broken checkpoint so resume never picks it up again (never deletes it)."""
    target = path.with_name(f"broken-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"broken-{path.name}.{n}")
    os.replace(path, target)
    return target
