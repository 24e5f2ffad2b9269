"""Ancestral sampling for masked diffusion (MDLM, Sahoo et al., 2024), docs/decoders.md#ancestral-sampling.

Within each block, times ``1 = t_N > … > t_0 = 0`` on a uniform grid. From ``t`` to ``s``
each still-masked token unmasks with probability ``(α_s − α_t) / (1 − α_t)``, taking its
value from ``x_θ(z_t)`` (SUBS: never the mask token); decoded tokens are never re-masked.

No-change cache: whether a token unmasks does not depend on the model, so the decision is
drawn first and the model is called only at steps where some token unmasks and the canvas
changed since the last call (exact for models without a time input). Under the linear
schedule each token unmasks at a uniform step, so the expected number of calls is
``N·(1 − (1 − 1/N)^L)`` rather than ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.decode import DECODERS
from dlm.decode.blocks import BlockState, DecodeConfig, sample_at, schedule_of
from dlm.decode.sampling import uniforms


class AncestralPolicy:
    def __init__(self, cfg: AncestralDecoder):
        self.cfg = cfg
        self.schedule = schedule_of(cfg.schedule, cfg.schedule_eps)

    def start_block(self, masked: Tensor, steps: int, generator) -> int:
        self.alphas = self.schedule.alpha(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64))
        return steps

    def step(self, state: BlockState, generator) -> tuple[Tensor, Tensor, Tensor]:
        a_t, a_s = self.alphas[state.step], self.alphas[state.step + 1]
        p = 1.0 if state.step == state.steps - 1 else float((a_s - a_t) / (1 - a_t))
        masked = state.masked
        u = uniforms(masked.numel(), generator, masked.device).view(masked.shape)
        decode = masked & (u < p)
        return (decode, *sample_at(state, decode, self.cfg, generator))


@DECODERS.register("ancestral")
@dataclass(frozen=True)
class AncestralDecoder(DecodeConfig):
    schedule: str = "loglinear"
    """Noise schedule whose α sets the per-step unmasking probabilities."""
    schedule_eps: float = 0.0

    def make_policy(self) -> AncestralPolicy:
        return AncestralPolicy(self)
