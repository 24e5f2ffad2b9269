"""Categorical sampling in float64 (SPEC §3).

float32 Gumbel noise is capped near 16.6, so tokens of probability below ~1e-7 relative to
the best are never drawn: the temperature is silently lowered and generative perplexity
looks better than it is. dlm samples by inverse CDF in float64: ``u ~ U[0,1)`` in float64,
the first token whose cumulative probability exceeds ``u``. Uniforms are drawn on the CPU
from the caller's generator, so a seed gives the same tokens on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_categorical(
    logits_NV: Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row; returns ``(tokens [N], log-probs [N] float64)``.

    The log-prob is that of the distribution sampled from (logits / temperature); at
    temperature 0 the choice is the argmax and the log-prob is under temperature 1.
    """
    logits = logits_NV.double()
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    cdf = logp.exp().cumsum(dim=-1)
    u = torch.rand(logits.shape[0], 1, dtype=torch.float64, generator=generator).to(logits.device)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
