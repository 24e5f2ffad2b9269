"""The dlm transformer backbone (an HF ``PreTrainedModel``) and its KV cache.

Importing this package registers ``DLMConfig`` / ``DLMModel`` with transformers' Auto classes, so
``AutoModel.from_pretrained(path)`` loads a dlm checkpoint.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from dlm.model.cache import KVCache
from dlm.model.configuration import DLMConfig
from dlm.model.modeling import DLMModel, DLMOutput

AutoConfig.register(DLMConfig.model_type, DLMConfig, exist_ok=True)
AutoModel.register(DLMConfig, DLMModel, exist_ok=True)
AutoModelForMaskedLM.register(DLMConfig, DLMModel, exist_ok=True)

__all__ = ["DLMConfig", "DLMModel", "DLMOutput", "KVCache"]
