"""The dlm transformer backbone (an HF ``PreTrainedModel``) and its KV cache."""

from dlm.model.cache import KVCache
from dlm.model.configuration import DLMConfig
from dlm.model.modeling import DLMModel, DLMOutput

__all__ = ["DLMConfig", "DLMModel", "DLMOutput", "KVCache"]
