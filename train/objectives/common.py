"""What every objective shares: its output (``LossOutput``), SUBS log-probabilities and the
logits-from positions of paired BD3-LM rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.model.modeling import is_shifted


@dataclass
class LossOutput:
    total: Tensor  # summed loss over the micro-batch (scalar)
    count: Tensor  # normaliser (tokens, or sequences for SFT)


def subs_log_probs(logits: Tensor, mask_token_id: int) -> Tensor:
    """SUBS zero-masking: the model never predicts the mask token; float32 log-softmax."""
    is_mask = torch.arange(logits.shape[-1], device=logits.device) == mask_token_id
    return torch.log_softmax(logits.float().masked_fill(is_mask, float("-inf")), dim=-1)  # never in place


def paired_logits_from(model: torch.nn.Module, seq_len: int, block_size: int, device) -> dict[str, Tensor]:
    """Forward kwargs for ``[z_t ⊕ x]`` rows: a shifted model reads each block's first logits from
    the clean previous token (:func:`dlm.model.masks.bd3lm_logits_from`); others need nothing."""
    if not is_shifted(model):
        return {}
    from dlm.model.masks import bd3lm_logits_from

    return {"logits_from": bd3lm_logits_from(seq_len, block_size, device)}
