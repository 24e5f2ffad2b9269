"""dlm: discrete / masked diffusion language models.

Importing dlm registers ``DLMConfig`` / ``DLMModel`` with transformers' Auto classes, so
``AutoModel.from_pretrained(path)`` loads a dlm checkpoint.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from dlm.model import DLMConfig, DLMModel, DLMOutput, KVCache

__version__ = "0.1.0"

AutoConfig.register(DLMConfig.model_type, DLMConfig, exist_ok=True)
AutoModel.register(DLMConfig, DLMModel, exist_ok=True)
AutoModelForMaskedLM.register(DLMConfig, DLMModel, exist_ok=True)


def load(name_or_path, **kwargs):
    """``(model, tokenizer, path)`` from a dlm checkpoint, a run directory, a checkpoint of a family
    ``dlm convert`` knows, or a hub id; see :func:`dlm.loading.load`."""
    from dlm.loading import load as _load

    return _load(name_or_path, **kwargs)


__all__ = ["DLMConfig", "DLMModel", "DLMOutput", "KVCache", "__version__", "load"]
