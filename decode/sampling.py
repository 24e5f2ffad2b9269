"""Categorical sampling in float64 (docs/decoders.md#categorical-sampling), with temperature, top-k and top-p.

float32 Gumbel noise is capped near 16.6, so a token whose logit is more than ~16.6 below the
best is never drawn: the temperature is silently lowered and generative perplexity looks
better than it is. dlm samples by inverse CDF: ``u ~ U[0,1)`` in float64 against the float64
cumulative weights, taking the first token whose cumulative weight exceeds ``u``. The weights
(the softmax) are computed in float32, which keeps every probability down to ~1e-38 with 1e-7
relative error; what float32 Gumbel loses is the tail of the *noise*, which inverse-CDF sampling
does not have. Uniforms are drawn on the CPU from the caller's generator, so a seed gives the
same tokens on any device.

This runs once per decoding step over every candidate row ``[N, V]``, so it is written to touch
``[N, V]`` as few times as it can: one fused softmax, one float32 pass of chunk sums, and
float64 only on ``[N, V / 256]`` and the one chosen chunk of each row. Within a decode, the
``[N, V]`` working tensor reuses one buffer (:class:`Scratch`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor


class Scratch:
    """One reusable buffer for the sampler's ``[N, V]`` working tensor, held by a decode.

    On the CPU a fresh tensor of this size (N = 256 candidates at V = 126,464 is 130 MB) is a new
    mapping from the operating system, and its page faults cost more than the softmax that fills
    it: 2.4 ns per element fresh against 1.0 into a reused buffer on a 2-core Xeon. CUDA's caching
    allocator already reuses memory, so on other devices :meth:`empty_like` is a plain allocation.
    A decode enters :meth:`active` around each step; :func:`sample_categorical` then works in this
    buffer. Nothing it returns aliases the buffer.
    """

    def __init__(self):
        self.flat: Tensor | None = None

    def empty_like(self, like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.empty_like(like)
        shape = tuple(like.shape)
        n = math.prod(shape)
        if self.flat is None or self.flat.dtype != like.dtype or self.flat.numel() < n:
            self.flat = None  # free the old buffer before the new one is allocated
            self.flat = torch.empty(n, dtype=like.dtype)
        return self.flat[:n].view(shape)

    @contextmanager
    def active(self):
        token = _SCRATCH.set(self)
        try:
            yield self
        finally:
            _SCRATCH.reset(token)


_SCRATCH: ContextVar[Scratch | None] = ContextVar("dlm_sampler_scratch", default=None)


def work_like(like: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``like``: the active decode's buffer, or a new one."""
    scratch = _SCRATCH.get()
    return torch.empty_like(like) if scratch is None else scratch.empty_like(like)


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


CHUNK = 256


def inverse_cdf(weights_NV: Tensor, u_N: Tensor) -> tuple[Tensor, Tensor]:
    """The first token whose float64 cumulative weight exceeds ``u · total`` (weights >= 0),
    and the float64 ``total`` of each row.

    Two levels, so nothing of length V is cumulated and nothing of size ``[N, V]`` is copied:
    sums of chunks of ``C = min(256, V)`` tokens (a strided view; the last chunk may be shorter),
    cumulated in float64, locate the chunk, and a float64 cumulative sum inside that chunk locates
    the token. A chunk's sum is taken in the weights' precision (pairwise: relative error ~1e-7,
    that of the float32 weights themselves; a float64 sum would first copy all of ``[N, V]`` to
    float64). A token of zero weight is never returned.
    """
    N, V = weights_NV.shape
    w = weights_NV if weights_NV.stride(-1) == 1 else weights_NV.contiguous()
    C = min(CHUNK, V)
    K, rest = divmod(V, C)
    full = w.as_strided((N, K, C), (w.stride(0), C, 1))  # [N, K, C] view
    chunk = full.sum(dim=-1).double()  # [N, K]
    if rest:
        chunk = torch.cat([chunk, w[:, K * C :].sum(dim=-1, keepdim=True).double()], dim=1)
    ccdf = chunk.cumsum(dim=-1)
    target = u_N[:, None] * ccdf[:, -1:]  # [N, 1]
    k = torch.searchsorted(ccdf, target, right=True).clamp(max=ccdf.shape[1] - 1)  # [N, 1]
    before = ccdf.gather(1, k) - chunk.gather(1, k)
    cols = k * C + torch.arange(C, device=w.device)  # [N, C] the chosen chunk's columns
    inner = w.gather(1, cols.clamp(max=V - 1)).double().masked_fill(cols >= V, 0.0).cumsum(dim=-1)
    j = torch.searchsorted(inner, target - before, right=True)
    last_positive = (inner < inner[:, -1:]).sum(dim=-1, keepdim=True)  # guards against rounding at the edge
    return (k * C + torch.minimum(j, last_positive)).squeeze(1), ccdf[:, -1]


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
    logits = logits_NV.float() if logits_NV.dtype in (torch.float16, torch.bfloat16) else logits_NV
    if temperature <= 0:
        best = logits.max(dim=-1)
        # log-prob of the argmax under temperature 1, for RL: −log(1 + Σ_{others} exp(logit − max)) <= 0;
        # summing the others alone keeps a confident row's log-prob (−rest) to float32's relative error
        rest = (
            torch.sub(logits, best.values[:, None], out=work_like(logits))
            .exp_()
            .scatter_(1, best.indices[:, None], 0.0)
        )
        return best.indices, -rest.sum(dim=-1).double().log1p()
    if temperature != 1.0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1, out=work_like(logits))  # one fused kernel; filtered tokens get exactly 0
    tokens, total = inverse_cdf(probs, uniforms(logits.shape[0], generator, logits.device))
    logp = (probs.gather(-1, tokens[:, None]).squeeze(-1).double() / total).log()  # of what was sampled
    return tokens, logp
