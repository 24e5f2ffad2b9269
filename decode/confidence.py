"""Confidence decoding (LLaDA low-confidence remasking / MaskGIT) and Fast-dLLM parallel
decoding (docs/decoders.md#confidence-decoding).

Each step predicts every eligible masked position (argmax, or a float64 sample at the
temperature), scores it, and keeps a number of the best-scored; the rest stay masked.

Scores (``remasking``): ``confidence`` — the model probability of the chosen token (LLaDA's
low-confidence remasking); ``margin`` — top-1 minus top-2 probability; ``entropy`` — negative
entropy of the predictive distribution; ``random`` — a uniform random order.

How many per step (``rule``):
* ``schedule`` — LLaDA: a block with ``M`` masked tokens and ``S`` steps decodes ``M // S`` per
  step, the first ``M % S`` steps one more;
* ``threshold`` — Fast-dLLM: every position with score ≥ ``threshold``, and always at least
  the single best; the step count adapts (``steps`` is then unused);
* ``factor`` — Fast-dLLM: sort scores descending and decode the largest ``n`` with
  ``(n + 1)(1 − c_(n)) < factor`` (at least one).
Scores are model probabilities at temperature 1 whatever the sampling temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.decode import DECODERS
from dlm.decode.blocks import BlockState, DecodeConfig
from dlm.decode.sampling import sample_categorical, uniforms, work_like

REMASKING = ("confidence", "margin", "entropy", "random")
RULES = ("schedule", "threshold", "factor")


def transfer_schedule(n_masked: Tensor, steps: int) -> Tensor:
    """LLaDA's per-step counts ``[B, steps]``: ``M // S`` each, the first ``M % S`` one more."""
    base, extra = n_masked // steps, n_masked % steps
    return base[:, None] + (torch.arange(steps, device=n_masked.device)[None] < extra[:, None]).long()


def scores(logits_NV: Tensor, tokens_N: Tensor, kind: str, generator) -> Tensor:
    """Per-candidate score (higher = decode sooner); float32 over the model distribution."""
    if kind == "random":
        return uniforms(tokens_N.shape[0], generator, tokens_N.device).float()
    logits = logits_NV.float()
    logp = torch.log_softmax(logits, dim=-1, out=work_like(logits))
    if kind == "confidence":
        return logp.gather(-1, tokens_N[:, None]).squeeze(-1).exp()
    if kind == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[:, 0] - top2[:, 1]
    p = logp.exp()
    return (p * logp.clamp(min=-1e30)).sum(dim=-1)  # negative entropy


def count_from_rule(conf_BT: Tensor, masked: Tensor, rule: str, threshold: float, factor: float) -> Tensor:
    """Number of positions to decode per row under the threshold or factor rule (>= 1 where masked)."""
    if rule == "threshold":
        k = ((conf_BT >= threshold) & masked).sum(dim=1)
    else:  # factor: largest n with (n + 1)(1 - c_(n)) < f, c sorted descending, n counted from 1
        c = conf_BT.masked_fill(~masked, float("-inf")).sort(dim=1, descending=True).values
        n = torch.arange(1, c.shape[1] + 1, device=c.device)
        ok = ((n + 1) * (1 - c) < factor) & torch.isfinite(c)
        k = torch.where(ok, n, torch.zeros_like(n)).max(dim=1).values
    return torch.where(masked.any(dim=1), k.clamp(min=1), torch.zeros_like(k))


class ConfidencePolicy:
    def __init__(self, cfg: ConfidenceDecoder):
        self.cfg = cfg
        self.counts: Tensor | None = None  # [B, steps] schedule rule: tokens to decode per step

    def start_block(self, masked: Tensor, steps: int, generator) -> int:
        if self.cfg.rule == "schedule":
            self.counts = transfer_schedule(masked.sum(dim=1), steps)
            return steps
        return masked.shape[1]  # at least one per step: the block ends within its length

    def reindex(self, index: Tensor) -> None:
        """Rows follow ``index`` (resampled particles keep their per-step counts)."""
        if self.counts is not None:
            self.counts = self.counts[index.to(self.counts.device)]

    def step(self, state: BlockState, generator) -> tuple[Tensor, Tensor, Tensor]:
        cfg, masked = self.cfg, state.masked
        cand_logits = state.logits(masked)  # [N, V]: one row per masked position
        tokens_N, logp_N = sample_categorical(cand_logits, cfg.temperature, generator, cfg.top_k, cfg.top_p)
        conf = torch.full(masked.shape, float("-inf"), device=masked.device)
        plain = cfg.temperature in (0.0, 1.0) and cfg.top_k is None and cfg.top_p is None
        if cfg.remasking == "confidence" and plain:  # the sampler's log-prob is already the model's
            conf[masked] = logp_N.exp().float()
        else:
            conf[masked] = scores(cand_logits, tokens_N, cfg.remasking, generator)
        if cfg.rule == "schedule":
            k = self.counts[:, state.step]
        else:
            k = count_from_rule(conf, masked, cfg.rule, cfg.threshold, cfg.factor)
        rank = conf.argsort(dim=1, descending=True).argsort(dim=1)
        decode = masked & (rank < k[:, None])
        tokens = torch.zeros_like(masked, dtype=torch.long)
        logprobs = torch.zeros(masked.shape, dtype=torch.float64, device=masked.device)
        tokens[masked], logprobs[masked] = tokens_N, logp_N
        return decode, tokens, logprobs


@DECODERS.register("confidence")
@dataclass(frozen=True)
class ConfidenceDecoder(DecodeConfig):
    remasking: str = "confidence"
    """Score: confidence, margin, entropy or random."""
    rule: str = "schedule"
    """How many per step: schedule (LLaDA), threshold or factor (Fast-dLLM)."""
    threshold: float = 0.9
    factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r}; choose one of {', '.join(REMASKING)}")
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r}; choose one of {', '.join(RULES)}")
        if self.factor <= 0:
            raise ValueError(f"factor={self.factor} must be positive")

    def can_pipeline(self) -> bool:
        return self.rule != "schedule"  # the threshold and factor rules decode any window, >= 1 per row a step

    def make_policy(self) -> ConfidencePolicy:
        return ConfidencePolicy(self)
