"""Soft value-based decoding (SVDD; Li et al., 2024): inference-time alignment without training.

At every step each particle draws M candidate next canvases from the decoder's own step
``p(z_{s+1} | z_s)`` and keeps one with probability ∝ ``exp(v(z_{s+1}^{(m)}) / α)`` (α = 0: the
highest value, ties to the first). With the exact soft value ``v*`` and M → ∞ a step samples
``p(z_{s+1}|z_s)·exp(v*(z_{s+1})/α) / exp(v*(z_s)/α)``, whose product over the steps is the tilted
target ``q ∝ p·exp(r/α)``; a complete canvas is valued by its true reward. The default value
``r(x̂₀(z))`` (the reward of the denoiser's greedy completion) makes it SVDD-PM, an approximation.

The M candidates of a particle share its state, so the decoder's model call runs once per particle
(rows of a candidate group are identical at every call, ``Decoding(shared=M)``); values cost one
call per changed candidate. Particles are independent: each returned particle is one sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.decode.blocks import Decoding
from dlm.decode.guides import GUIDES
from dlm.decode.guides.base import Values, as_reward, check_alpha, draw, expand, finish


@GUIDES.register("svdd")
@dataclass(frozen=True)
class SVDD:
    particles: int = 1
    """Independent particles per prompt (K); one is returned."""
    candidates: int = 8
    """Candidate steps per particle and step (M)."""
    alpha: float = 0.0
    """Selection temperature: keep a candidate ∝ exp(v/α); 0 = the best value."""

    def __post_init__(self):
        if self.particles < 1 or self.candidates < 1:
            raise ValueError(f"particles={self.particles} and candidates={self.candidates} must be >= 1")
        check_alpha(self.alpha, True, "SVDD keeps a candidate ∝ exp(v/α)")

    def select(self, v_GM, generator) -> torch.Tensor:
        """The kept candidate of each group ``[G]``."""
        if self.alpha == 0:
            return v_GM.argmax(dim=1)
        return draw(v_GM / self.alpha, generator)

    def __call__(self, decoder, model, prompt_ids, *, reward, value=None, attention_mask=None, generator=None):
        B, K, M = prompt_ids.shape[0], self.particles, self.candidates
        ids, pad = expand(prompt_ids, attention_mask, K * M)
        dec = Decoding(decoder, decoder.make_policy(), model, ids, pad, generator, shared=M)
        values = Values(model, as_reward(reward), value, B, K * M)
        device = dec.x.device
        v = torch.zeros(B * K * M, dtype=torch.float64, device=device)
        seen = dec.x.clone()
        groups = torch.arange(B * K, device=device)
        while dec.advance():
            if M == 1:
                continue  # one candidate: nothing to choose, so no value is needed
            changed = (dec.x != seen).any(dim=1).nonzero().squeeze(1)
            v[changed] = values(dec, changed)
            kept = self.select(v.view(B * K, M), generator).to(device)
            index = (groups * M + kept).repeat_interleave(M)
            dec.reindex(index)
            v, seen = v[index], dec.x.clone()
        rewards = values.rewards(dec, torch.arange(0, B * K * M, M, device=device)).view(B, K)
        log_w = torch.zeros(B, K, dtype=torch.float64, device=device)  # independent, equally weighted samples
        chosen = draw(log_w, generator).cpu()
        return finish(dec, values, K, log_w, chosen, stride=M, rewards=rewards)
