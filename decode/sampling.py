"""Categorical sampling in float64 (SPEC §3), with temperature, top-k and top-p.

float32 Gumbel noise is capped near 16.6, so a token whose logit is more than ~16.6 below the
best is never drawn: the temperature is silently lowered and generative perplexity looks
better than it is. dlm samples by inverse CDF in float64: ``u ~ U[0,1)`` in float64 and the
first token whose cumulative probability exceeds ``u``. Uniforms are drawn on the CPU from the
caller's generator, so a seed gives the same tokens on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits_NV: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the ``top_k`` largest logits and the smallest set whose probability reaches ``top_p``."""
    if top_k is not None and top_k < logits_NV.shape[-1]:
        kth = logits_NV.topk(top_k, dim=-1).values[..., -1:]
        logits_NV = logits_NV.masked_fill(logits_NV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits_NV.sort(dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_NV = logits_NV.masked_fill(drop, float("-inf"))
    return logits_NV


def uniforms(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """float64 uniforms drawn on the CPU (device-independent streams), moved to ``device``."""
    return torch.rand(n, dtype=torch.float64, generator=generator).to(device)


def sample_categorical(
    logits_NV: Tensor,
    temperature: float,
    generator: torch.Generator | None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row; returns ``(tokens [N], log-probs [N] float64)``.

    The log-prob is that of the distribution actually sampled from (tempered and filtered);
    at temperature 0 the token is the argmax and the log-prob is under temperature 1.
    """
    logits = logits_NV.double()
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    logits = filter_logits(logits / temperature if temperature != 1.0 else logits, top_k, top_p)
    weights = (logits - logits.max(dim=-1, keepdim=True).values).exp()  # unnormalised float64 probabilities
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = uniforms(logits.shape[0], generator, logits.device)[:, None]
    tokens = torch.searchsorted(cdf, u * total, right=True).clamp(max=logits.shape[-1] - 1)
    logp = (weights.gather(-1, tokens) / total).log()
    return tokens.squeeze(-1), logp.squeeze(-1)
