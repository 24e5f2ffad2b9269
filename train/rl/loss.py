"""Group-relative advantages and the clipped policy loss, as pure functions (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor, group: Tensor, scale_std: bool = False, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """``A = r − mean(group)`` (÷ std when ``scale_std``) and a ``[B]`` flag of zero-variance groups.

    A group of one rollout has no baseline to compare with: that is an error, not a zero signal.
    """
    ids, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError(
            "group-relative advantages need at least 2 rollouts per prompt (a group of 1 gives no signal); "
            "raise the group size"
        )
    r = rewards.double()
    mean = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, r) / counts
    centred = r - mean[inverse]
    var = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, centred**2) / (counts - 1)
    std = var.sqrt()[inverse]
    zero = std < eps
    adv = centred / (std + eps) if scale_std else centred
    return adv.float(), zero


@dataclass
class PolicyLoss:
    loss: Tensor
    clip_fraction: float
    kl: float
    ratio_mean: float


NORMS = ("token", "sequence", "step", "none")


def policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    logp_ref: Tensor | None = None,
    beta: float = 0.0,
    norm: str = "token",
    step_map: Tensor | None = None,
) -> PolicyLoss:
    """Per-token PPO clip ``−min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A)`` (+ ``β`` · k3 KL to a reference).

    ``logp_*`` and ``mask`` are ``[B, T]``; ``advantages`` is ``[B]`` (one per rollout).
    ``norm``: ``token`` (mean over all tokens of the batch), ``sequence`` (length normalisation:
    mean per rollout, then over rollouts), ``step`` (mean over the tokens decoded at each decoding
    step, then over all (rollout, step) pairs — a step that decoded many tokens in parallel counts
    once; needs ``step_map``), ``none`` (sum).
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; choose one of {', '.join(NORMS)}")
    if norm == "step" and step_map is None:
        raise ValueError("norm='step' needs the rollouts' step_map")
    m = mask.float()
    ratio = torch.exp(logp_new - logp_old.detach())
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if logp_ref is not None and beta > 0:
        d = logp_ref.detach() - logp_new
        kl = torch.exp(d) - d - 1  # k3, >= 0
        per_token = per_token + beta * kl
    if norm == "token":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif norm == "sequence":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif norm == "step":
        steps = int(step_map.max()) + 2
        key = (torch.arange(len(m), device=m.device)[:, None] * steps + step_map.clamp(min=-1) + 1)[mask.bool()]
        sums = torch.zeros(len(m) * steps, device=m.device, dtype=per_token.dtype).index_add(
            0, key, per_token[mask.bool()]
        )
        counts = torch.zeros(len(m) * steps, device=m.device).index_add(0, key, torch.ones_like(key, dtype=torch.float))
        used = counts > 0
        loss = (sums[used] / counts[used]).mean() if bool(used.any()) else per_token.sum() * 0
    else:
        loss = (per_token * m).sum()
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = (
            float((is_clipped.float() * m).sum() / n),
            float((kl * m).sum() / n),
            float((ratio * m).sum() / n),
        )
    return PolicyLoss(loss, *stats)
