"""dlm.decode.guides: reward-guided decoding, driven over the decoders' own block loop.

    guide = build_guide("smc", particles=8, alpha=0.5)
    decoder = build_decoder("first_hitting", gen_length=64, block_length=16)
    out = guide(decoder, model, prompt_ids, reward=reward, generator=torch.Generator().manual_seed(0))
    out.tokens, out.reward, out.particles, out.log_weights, out.nfe

The target is the reward-tilted distribution ``q(x | c) ∝ p(x | c)·exp(r(x)/α)`` of the decoder's
own distribution ``p`` (docs/guided-decoding.md). Guides:

* ``best_of_n`` — N independent samples, the highest reward kept (a baseline, not a sampler of q);
* ``smc`` — sequential Monte Carlo / Feynman–Kac: particles move by the decoder's steps, weighted
  by value increments, resampled when the effective sample size drops;
* ``svdd`` — soft value-based decoding: M candidate steps per particle, one kept ∝ exp(v/α);
* ``dts`` — diffusion tree sampling (``mode="sample"``) and search (``mode="search"``);
* ``edlm`` — energy-based parallel decoding: each parallel step's tokens importance-resampled
  under an energy (an AR model's log-likelihood, or a user callable).

A reward is a registry name (text rewards of ``dlm.train.rl.rewards``, given a tokenizer) or a
token-level callable ``reward(tokens_NG) -> Tensor[N]``; a value is ``value(canvas_NG, mask_id)
-> Tensor[N]`` (default: the reward of the denoiser's greedy completion of the canvas).
"""

from __future__ import annotations

from typing import Any

from dlm.registry import Registry

GUIDES: Registry[type] = Registry(
    "guide", builtins={name: f"dlm.decode.guides.{name}" for name in ("best_of_n", "dts", "edlm", "smc", "svdd")}
)


def build_guide(name: str, **settings: Any):
    """A guide from its registry name and settings; unknown names and keys list what exists."""
    return GUIDES.build(name, **settings)


def guide_names() -> list[str]:
    """The registered guides (the built-ins without importing them)."""
    return GUIDES.names()
