"""Sequential Monte Carlo / Feynman–Kac steering (Singhal et al., 2025; Wu et al., 2023).

K particles per prompt move by the decoder's own steps, the proposal ``p(z_{s+1} | z_s)``. After
each step a particle's log-weight grows by ``(v(z_{s+1}) − v(z_s)) / α`` for a value estimate ``v``
(default ``r(x̂₀(z))``, the reward of the denoiser's greedy completion); a complete canvas is valued
by its true reward, so the increments telescope to ``r(x)/α − v(z_0)/α`` and, ``v(z_0)`` being one
constant per prompt, the weighted particles are consistent for ``q ∝ p·exp(r/α)`` as K → ∞ whatever
``v`` is — ``v`` only sets the variance. When the effective sample size ``(Σw)²/Σw²`` of a
prompt's particles falls below ``ess_threshold · K`` they are resampled (systematic or multinomial)
and their weights reset. The returned sample of a prompt is one particle drawn ∝ its final weight.

Departures: the initial value ``v(z_0)`` is not computed (it cancels); rows whose canvas did not
change in a step keep their value (no model call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlm.decode.blocks import Decoding
from dlm.decode.guides import GUIDES
from dlm.decode.guides.base import (
    Values,
    as_reward,
    check_alpha,
    draw,
    effective_sample_size,
    expand,
    finish,
    resample,
)

RESAMPLING = ("systematic", "multinomial")


@GUIDES.register("smc")
@dataclass(frozen=True)
class SMC:
    particles: int = 8
    """Particles per prompt (K)."""
    alpha: float = 1.0
    """Temperature of the tilt ``exp(r/α)``; large α → the decoder's own distribution."""
    ess_threshold: float = 0.5
    """Resample a prompt's particles when their effective sample size falls below this share of K."""
    resampling: str = "systematic"
    """systematic or multinomial."""

    def __post_init__(self):
        if self.particles < 1:
            raise ValueError(f"particles={self.particles} must be >= 1")
        check_alpha(self.alpha, False, "SMC weights by exp(v/α)")
        if not 0 <= self.ess_threshold <= 1:
            raise ValueError(f"ess_threshold={self.ess_threshold} must lie in [0, 1] (0 = never resample)")
        if self.resampling not in RESAMPLING:
            raise ValueError(f"resampling={self.resampling!r}; choose one of {', '.join(RESAMPLING)}")

    def __call__(self, decoder, model, prompt_ids, *, reward, value=None, attention_mask=None, generator=None):
        B, K = prompt_ids.shape[0], self.particles
        ids, pad = expand(prompt_ids, attention_mask, K)
        dec = Decoding(decoder, decoder.make_policy(), model, ids, pad, generator)
        values = Values(model, as_reward(reward), value, B, K)
        device = dec.x.device
        v = torch.zeros(B * K, dtype=torch.float64, device=device)  # v(z_0) cancels: start at 0
        log_w = torch.zeros(B, K, dtype=torch.float64, device=device)
        seen = dec.x.clone()
        resamples = 0
        while dec.advance():
            if K == 1:
                continue  # one particle: nothing to weigh or resample, so no value is needed
            changed = (dec.x != seen).any(dim=1).nonzero().squeeze(1)
            seen = dec.x.clone()
            new = v.clone()
            new[changed] = values(dec, changed)
            log_w += ((new - v) / self.alpha).view(B, K)
            v = new
            low = effective_sample_size(log_w) < self.ess_threshold * K
            if bool(low.any()):
                index = torch.arange(B * K, device=device).view(B, K)
                ancestors = resample(log_w[low], generator, self.resampling)
                index[low] = ancestors + (low.nonzero() * K)
                index = index.flatten()
                dec.reindex(index)
                v, seen = v[index], seen[index]
                log_w[low] = 0.0
                resamples += int(low.sum())
        # the last block's end may have finished rows (EOS): their text, and so their reward, is final now
        everything = torch.arange(B * K, device=device)
        rewards = values.rewards(dec, everything)
        log_w += ((rewards - v) / self.alpha).view(B, K)
        return finish(
            dec, values, K, log_w, draw(log_w, generator).cpu(), resamples=resamples, rewards=rewards.view(B, K)
        )
