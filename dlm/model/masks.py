"""Attention masks as pure functions of query and key indices (True = may attend).

Each function broadcasts over index tensors, so ``causal(q[:, None], k[None, :])`` builds the
full ``[Tq, Tk]`` matrix. The BD3-LM mask follows docs/objectives.md#bd3lm (Arriola et al., 2025): the input is
``[z_t ⊕ x]`` of length ``2L`` and both halves use positions ``0..L-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return kv_idx <= q_idx


def block_causal(q_idx: Tensor, kv_idx: Tensor, block_size: int) -> Tensor:
    """A query sees every key of its own block and of all earlier blocks."""
    return (kv_idx // block_size) <= (q_idx // block_size)


def bd3lm(q_idx: Tensor, kv_idx: Tensor, seq_len: int, block_size: int) -> Tensor:
    """BD3-LM training mask over ``[z_t ⊕ x]`` (indices ``0..2L-1``).

    Union of: block-diagonal within each half; offset block-causal from the noisy half to
    strictly earlier clean blocks; block-causal within the clean half.
    """
    q_clean, kv_clean = q_idx >= seq_len, kv_idx >= seq_len
    q_block = (q_idx % seq_len) // block_size
    kv_block = (kv_idx % seq_len) // block_size
    block_diagonal = (q_block == kv_block) & (q_clean == kv_clean)
    offset_block_causal = ~q_clean & kv_clean & (q_block > kv_block)
    clean_block_causal = q_clean & kv_clean & (q_block >= kv_block)
    return block_diagonal | offset_block_causal | clean_block_causal


def bd3lm_matrix(seq_len: int, block_size: int, device=None) -> Tensor:
    """The ``[2L, 2L]`` BD3-LM mask over ``[z_t ⊕ x]`` (training, and RL rows of block-causal models)."""
    idx = torch.arange(2 * seq_len, device=device)
    return bd3lm(idx[:, None], idx[None, :], seq_len, block_size)


def bd3lm_logits_from(seq_len: int, block_size: int, device=None) -> Tensor:
    """``[2L]``: for a shifted model (``logits_shift``) over ``[z_t ⊕ x]``, the column whose hidden
    state gives each position's logits. Inside a block the previous noisy token, as at decoding
    time; the first token of block ``b > 0`` reads the *clean* last token of block ``b − 1`` (what
    the decoder holds there); position 0 of each half reads itself."""
    idx = torch.arange(2 * seq_len, device=device)
    src = (idx - 1).clamp(min=0)
    src[seq_len] = seq_len
    starts = torch.arange(block_size, seq_len, block_size, device=device)
    src[starts] = seq_len + starts - 1
    return src


def structural_mask(mode: str, q_idx: Tensor, kv_idx: Tensor, block_size: int | None) -> Tensor | None:
    """The mask of an attention mode over index tensors, or None when everything is visible."""
    if mode == "bidirectional":
        return None
    if mode == "causal":
        return causal(q_idx, kv_idx)
    if mode == "block_causal":
        if not block_size:
            raise ValueError("attention_mode='block_causal' needs a block_size")
        return block_causal(q_idx, kv_idx, block_size)
    raise ValueError(f"attention mode {mode!r}; choose bidirectional, causal or block_causal")
