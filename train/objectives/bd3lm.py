"""BD3-LM: block diffusion (Arriola et al., 2025), docs/objectives.md#bd3lm.

The sequence is split into blocks of ``B`` tokens; block ``b`` gets its own time ``t_b``, only it
is noised, and it is denoised given the *clean* earlier blocks:

    NELBO = Σ_b E_{t_b} [ w(t_b) · Σ_{l ∈ b, masked} −log p_θ(x^l | z_t^b, x^{<b}) ]

Vectorised training feeds ``[z_t ⊕ x]`` (length 2L, both halves at positions 0..L−1) under the
mask of :func:`dlm.model.masks.bd3lm` and scores only the noisy half, so all blocks train in one
forward. ``B = L`` is MDLM; ``B = 1`` with every token masked is an autoregressive NLL.

Clipped schedules (BD3-LM §4): for training, each block's mask rate is drawn from ``U[β, ω]``
instead of ``U[0, 1]`` and masks are resampled until each block's realised masked fraction lies
in ``[β, ω]``; this lowers the estimator's variance but is no longer the NELBO, so validation
always uses the unclipped ``U[0, 1]`` bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dlm.config import ConfigError
from dlm.model.masks import bd3lm_matrix
from dlm.model.modeling import logits_of
from dlm.schedules import build_schedule, sample_times
from dlm.train.objectives import OBJECTIVES
from dlm.train.objectives.common import LossOutput, paired_logits_from, subs_log_probs

MAX_RESAMPLE_ROUNDS = 200


def bd3lm_inputs(x0_BL: Tensor, zt_BL: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[z_t ⊕ x]`` ``[B, 2L]``, its positions ``[B, 2L]`` and attention mask ``[1, 1, 2L, 2L]``."""
    B, L = x0_BL.shape
    mask = bd3lm_matrix(L, block_size, x0_BL.device)[None, None]
    positions = (torch.arange(2 * L, device=x0_BL.device) % L).expand(B, -1)
    return torch.cat([zt_BL, x0_BL], dim=1), positions, mask


def clip_counts(block_size: int, low: float, high: float) -> tuple[int, int]:
    """The mask counts ``k_min..k_max`` of a block of ``B`` whose fraction k/B lies in [low, high]
    (ends inclusive, to 1e-9: 0.3·10 is 3); empty when k_min > k_max."""
    return math.ceil(low * block_size - 1e-9), math.floor(high * block_size + 1e-9)


def clip_is_feasible(block_size: int, low: float, high: float) -> bool:
    """Some mask count k in 0..B has k/B in [low, high]."""
    k_min, k_max = clip_counts(block_size, low, high)
    return k_min <= k_max


class BD3LMObjective:
    name = "bd3lm"
    bound = "nelbo"

    def __init__(
        self,
        mask_token_id: int,
        block_size: int | None = None,
        schedule: str = "loglinear",
        schedule_args: dict | None = None,
        t_eps: float = 1e-3,
        antithetic: bool = True,
        clip_low: float = 0.0,
        clip_high: float = 1.0,
        **_: object,
    ):
        if not block_size or block_size < 1:
            raise ConfigError("objective=bd3lm needs diffusion.block_size (a positive integer dividing data.seq_len)")
        if not 0.0 <= clip_low < clip_high <= 1.0:
            raise ConfigError(f"diffusion.clip_low={clip_low}, clip_high={clip_high}: need 0 <= low < high <= 1")
        if not clip_is_feasible(block_size, clip_low, clip_high):
            raise ConfigError(
                f"no mask count k gives k/{block_size} in [{clip_low}, {clip_high}]; widen the clip "
                f"range or use a larger diffusion.block_size"
            )
        self.mask_token_id, self.block_size = mask_token_id, block_size
        self.schedule = build_schedule(schedule, **(schedule_args or {}))
        self.t_eps, self.antithetic = t_eps, antithetic
        self.clip = (clip_low, clip_high)
        self.attention = ("block_causal", block_size)  # how the trained model decodes

    def sample_noise(self, shape: tuple[int, int], generator: torch.Generator, for_eval: bool = False) -> dict:
        G, L = shape
        if L % self.block_size:
            raise ConfigError(
                f"diffusion.block_size={self.block_size} does not divide data.seq_len={L}; "
                "choose a block size that divides the sequence length"
            )
        n_blocks = L // self.block_size
        clipped = not for_eval and self.clip != (0.0, 1.0)
        if clipped:  # the mask rate itself is uniform on [β, ω]; t follows from it
            low, high = self.clip
            rate = low + (high - low) * sample_times(G * n_blocks, generator, 0.0, self.antithetic).view(G, n_blocks)
            t = self.schedule.alpha_inverse(1 - rate.double()).float().clamp(min=self.t_eps, max=1.0)
        else:
            t = sample_times(G * n_blocks, generator, self.t_eps, self.antithetic).view(G, n_blocks)
        p_mask = (1 - self.schedule.alpha(t)).repeat_interleave(self.block_size, dim=1)  # [G, L]
        masked = torch.rand(G, L, generator=generator) < p_mask
        if clipped:
            masked = self._resample(masked, p_mask, generator)
        return {"t": t, "masked": masked}

    def _resample(self, masked: Tensor, p_mask: Tensor, generator: torch.Generator) -> Tensor:
        """Redraw the masks of blocks whose masked fraction falls outside [β, ω] (BD3-LM)."""
        G, L = masked.shape
        low, high = self.clip
        k_min, k_max = clip_counts(self.block_size, low, high)
        for _ in range(MAX_RESAMPLE_ROUNDS):
            count = masked.view(G, -1, self.block_size).sum(-1)  # [G, blocks] masked tokens per block
            bad = ((count < k_min) | (count > k_max)).repeat_interleave(self.block_size, dim=1)
            if not bad.any():
                return masked
            fresh = torch.rand(G, L, generator=generator) < p_mask
            masked = torch.where(bad, fresh, masked)
        raise RuntimeError(f"could not draw masks within [{low}, {high}] in {MAX_RESAMPLE_ROUNDS} rounds")

    def loss(self, model, batch: dict[str, Tensor], noise: dict[str, Tensor]) -> LossOutput:
        x0 = batch["input_ids"]
        B, L = x0.shape
        masked = noise["masked"].to(x0.device)
        t = noise["t"].to(x0.device)
        zt = torch.where(masked, torch.full_like(x0, self.mask_token_id), x0)
        inputs, positions, attn = bd3lm_inputs(x0, zt, self.block_size)
        scored = torch.cat([masked, torch.zeros_like(masked)], dim=1)  # only the noisy half is scored
        shift = paired_logits_from(model, L, self.block_size, x0.device)
        logits = logits_of(model(inputs, attention_mask=attn, position_ids=positions, output_mask=scored, **shift))
        nll = -subs_log_probs(logits, self.mask_token_id).gather(-1, x0[masked][:, None]).squeeze(-1)
        weight = self.schedule.weight(t).repeat_interleave(self.block_size, dim=1)[masked]
        return LossOutput(
            (weight * nll).sum(),
            torch.tensor(float(x0.numel()), device=x0.device),
        )


@OBJECTIVES.register("bd3lm")
def build_bd3lm(**kwargs) -> BD3LMObjective:
    return BD3LMObjective(**kwargs)
