"""Atomic checkpoints and exact resume.

A checkpoint directory ``checkpoint-<step>`` holds the HF-format model (safetensors) and
tokenizer, ``optimizer.pt``, ``scheduler.pt``, ``ema.safetensors`` (when EMA is on),
``rng_<rank>.pt`` per process (Python, NumPy, torch and, where present, CUDA generators), and
``trainer_state.json`` (step, data position and the recipe identity the run was started with). It
is written into a hidden temporary directory and renamed into place only when complete, so a crash
mid-save never leaves a half-written checkpoint that resume would pick up; older checkpoints are
pruned only after the new one is in place. Everything is loaded with ``weights_only=True``: a file
planted in a run directory cannot execute code on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dlm.config import ConfigError
from dlm.train.engine import is_sharded

PREFIX = "checkpoint-"
STATE = "trainer_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def rng_state() -> dict[str, Any]:
    """Every generator's state, in types ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def expected_files(ema: bool, lora: bool = False, sharded: str | None = None, world: int = 1) -> list[str]:
    """Files a complete checkpoint holds (beyond the tokenizer). ``sharded``: the engine of a
    sharded run (``fsdp2``, ``deepspeed``), whose model and optimizer are accelerate states."""
    if sharded is not None:
        states = ["pytorch_model_fsdp_0", "optimizer_0"] if sharded.startswith("fsdp") else []
        emas = [f"ema-{r}.safetensors" for r in range(world)] if ema else []
        return [STATE, "scheduler.pt", *states, *[f"random_states_{r}.pkl" for r in range(world)], *emas]
    weights = ADAPTER if lora else "model.safetensors"  # or its index and shards
    return [STATE, "config.json" if not lora else "adapter_config.json", weights, "optimizer.pt", "scheduler.pt"] + (
        ["ema.safetensors"] if ema else []
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    ema,
    state: dict[str, Any],
    keep: int,
) -> Path:
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if is_sharded(accelerator):
        _save_sharded(accelerator, tmp, model, tokenizer, scheduler, ema)
    else:
        _save_whole(accelerator, tmp, model, tokenizer, optimizer, scheduler, ema)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE, "w") as fh:  # written last: its presence marks a complete checkpoint
            json.dump({**state, "step": step}, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # every process finished writing before the rename
        _fsync_dir(output_dir)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save_sharded(accelerator, tmp: Path, model, tokenizer, scheduler, ema) -> None:
    """FSDP / DeepSpeed: accelerate writes the sharded model and optimizer and every process's
    generators; each process writes the EMA of its own shards."""
    accelerator.save_state(str(tmp), safe_serialization=True)
    if ema is not None:
        save_file(
            {k: v.contiguous() for k, v in ema.state_dict().items()},
            tmp / f"ema-{accelerator.process_index}.safetensors",
        )
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")


def _save_whole(accelerator, tmp: Path, model, tokenizer, optimizer, scheduler, ema) -> None:
    """One process or DDP: an HF model directory plus optimizer, scheduler, EMA and generators."""
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")


def safe_load(path: Path) -> Any:
    """``torch.load`` of tensors and plain containers only: a pickle that would run code is refused."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"{path} holds objects other than tensors, which dlm never writes; loading it was refused and nothing "
            f"in it ran ({first}). Delete that checkpoint or resume from another one"
        ) from None


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler, ema) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state."""
    state_path = path / STATE
    if not state_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete dlm checkpoint (no {STATE}); "
            f"pick one of {[p.name for p in list_checkpoints(path.parent)]}"
        )
    if is_sharded(accelerator):
        accelerator.load_state(str(path))  # the sharded model and optimizer, every process's generators
        scheduler.load_state_dict(safe_load(path / "scheduler.pt"))
        if ema is not None:
            ema.load_state_dict(load_file(path / f"ema-{accelerator.process_index}.safetensors"))
        with open(state_path) as fh:
            return json.load(fh)
    _load_weights(accelerator.unwrap_model(model), path)
    optimizer.load_state_dict(safe_load(path / "optimizer.pt"))
    scheduler.load_state_dict(safe_load(path / "scheduler.pt"))
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"checkpoint {path} was written without EMA; resume with train.ema_decay=0")
        ema.load_state_dict(load_file(path / "ema.safetensors"))
    rng_path = path / f"rng_{accelerator.process_index}.pt"
    if rng_path.is_file():
        set_rng_state(safe_load(rng_path))
    with open(state_path) as fh:
        return json.load(fh)


ADAPTER = "adapter_model.safetensors"


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A directory's safetensors weights: ``model.safetensors``, or every shard its index names."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(path / "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(path / shard))
    return state


def _load_weights(model, path: Path) -> None:
    """The model's weights from a checkpoint: full weights, or a LoRA adapter for a peft model."""
    lora = hasattr(model, "peft_config")
    if lora != (path / ADAPTER).is_file():
        have = "a LoRA adapter" if (path / ADAPTER).is_file() else "full model weights"
        want = "a LoRA adapter (lora.r > 0)" if lora else "full weights (lora.r = 0)"
        raise ValueError(
            f"checkpoint {path} holds {have} but this run trains {want}; resume with the recipe that wrote it"
        )
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(path / ADAPTER))
        if result.unexpected_keys:
            raise ValueError(
                f"checkpoint {path}'s adapter does not match the model: unexpected "
                f"{sorted(result.unexpected_keys)[:3]}; resume with the lora settings that wrote it"
            )
        return
    missing, unexpected = model.load_state_dict(load_weights(path), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; resume with the recipe that wrote it"
        )


def export_final(path: Path, model, tokenizer, ema, accelerator=None, max_shard_size: str = "2GB") -> Path | None:
    """Write the model (with EMA weights when EMA is on) and tokenizer to ``path`` as an HF model
    directory (safetensors, sharded above ``max_shard_size`` with an index), atomically.

    With an ``accelerator`` every process must call it: under a sharded engine the full state dict
    is gathered (collective) and the main process writes it. Returns the path on the main process.
    """
    from contextlib import nullcontext

    sharded = accelerator is not None and is_sharded(accelerator)
    plain = accelerator.unwrap_model(model) if accelerator is not None else model
    with ema.swapped_in(plain) if ema is not None else nullcontext():
        state = accelerator.get_state_dict(model) if sharded else None  # every process takes part
        if accelerator is not None and not accelerator.is_main_process:
            return None
        if state is not None and getattr(plain.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # gathered apart from the embedding it is tied to
        tmp = path.parent / f".tmp-{path.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
