"""dlm: discrete / masked diffusion language models.

``import dlm`` is light (no torch, no transformers): the command line's ``--help`` answers at
once. The model classes load on first use — ``dlm.DLMModel``, ``dlm.load(...)``, or
``import dlm.model``, which also registers ``DLMConfig`` / ``DLMModel`` with transformers' Auto
classes, so ``AutoModel.from_pretrained(path)`` then loads a dlm checkpoint.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_MODEL_NAMES = ("DLMConfig", "DLMModel", "DLMOutput", "KVCache")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("dlm.model"), name)
    raise AttributeError(f"module 'dlm' has no attribute {name!r}")


def load(name_or_path, **kwargs):
    """``(model, tokenizer, path)`` from a dlm checkpoint, a run directory, a checkpoint of a family
    ``dlm convert`` knows, or a hub id; see :func:`dlm.loading.load`."""
    from dlm.loading import load as _load

    return _load(name_or_path, **kwargs)


__all__ = ["DLMConfig", "DLMModel", "DLMOutput", "KVCache", "__version__", "load"]
