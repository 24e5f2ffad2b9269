"""Best-of-N: decode N independent samples per prompt and keep the one with the highest reward.

The baseline every guided decoder is compared with at equal NFE. It is not a sampler of the tilted
target ``q ∝ p·exp(r/α)``: as N grows it concentrates on the reward's maximisers within the
support of ``p`` (the α → 0 limit), whatever the spread of ``q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.decode.blocks import Decoding
from dlm.decode.guides import GUIDES
from dlm.decode.guides.base import Values, as_reward, expand, finish


@GUIDES.register("best_of_n")
@dataclass(frozen=True)
class BestOfN:
    particles: int = 8
    """Samples per prompt (N)."""

    def __post_init__(self):
        if self.particles < 1:
            raise ValueError(f"particles={self.particles} must be >= 1")

    def __call__(self, decoder, model, prompt_ids, *, reward, value=None, attention_mask=None, generator=None):
        """``value`` is unused (best-of-N looks only at finished samples)."""
        B, N = prompt_ids.shape[0], self.particles
        ids, pad = expand(prompt_ids, attention_mask, N)
        dec = Decoding(decoder, decoder.make_policy(), model, ids, pad, generator)
        while dec.advance():
            pass
        values = Values(model, as_reward(reward), None, B, N)
        rewards = values.rewards(dec, torch.arange(B * N, device=dec.x.device)).view(B, N)
        best = rewards.argmax(dim=1).cpu()
        log_w = torch.full((B, N), float("-inf"), dtype=torch.float64, device=rewards.device)
        log_w[torch.arange(B), best] = 0.0  # all the mass on the kept sample
        return finish(dec, values, N, log_w, best, rewards=rewards)
