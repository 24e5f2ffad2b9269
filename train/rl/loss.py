"""Group-relative advantages and the clipped policy loss, as pure functions (docs/rl.md)."""

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


def step_keys(mask: Tensor, step_map: Tensor) -> tuple[Tensor, int]:
    """One integer per masked token naming its (rollout, decoding step) pair, and the key range."""
    steps = int(step_map.max()) + 2
    key = (torch.arange(len(mask), device=mask.device)[:, None] * steps + step_map.clamp(min=-1) + 1)[mask.bool()]
    return key, len(mask) * steps


def loss_count(mask: Tensor, norm: str, step_map: Tensor | None = None) -> float:
    """What ``norm`` divides this batch's loss by: its tokens (``token``), rollouts (``sequence``),
    (rollout, step) pairs (``step``), 1 (``none``). Processes that train on one global batch sum
    their counts, so that N processes reproduce one (``policy_loss(count=...)``)."""
    if norm == "token":
        return float(mask.sum())
    if norm == "sequence":
        return float(len(mask))
    if norm == "step":
        key, _ = step_keys(mask, step_map)
        return float(len(torch.unique(key)))
    return 1.0


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
    count: float | None = None,
) -> PolicyLoss:
    """Per-token PPO clip ``−min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A)`` (+ ``β`` · k3 KL to a reference).

    ``logp_*`` and ``mask`` are ``[B, T]``; ``advantages`` is ``[B]`` (one per rollout).
    ``norm``: ``token`` (mean over all tokens of the batch), ``sequence`` (length normalisation:
    mean per rollout, then over rollouts), ``step`` (mean over the tokens decoded at each decoding
    step, then over all (rollout, step) pairs — a step that decoded many tokens in parallel counts
    once; needs ``step_map``), ``none`` (sum).

    ``count``: the divisor of the normalisation (default: this batch's own, ``loss_count``, at
    least 1). A process holding part of a global batch whose gradients are averaged over ``N``
    processes passes the global count ÷ N: the mean of its gradients is then that of one process
    holding the whole batch, also when the processes hold different numbers of tokens or steps.
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
        total = (per_token * m).sum()
    elif norm == "sequence":
        total = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum()
    elif norm == "step":
        key, size = step_keys(mask, step_map)
        sums = torch.zeros(size, device=m.device, dtype=per_token.dtype).index_add(0, key, per_token[mask.bool()])
        counts = torch.zeros(size, device=m.device).index_add(0, key, torch.ones_like(key, dtype=torch.float))
        used = counts > 0
        total = (sums[used] / counts[used]).sum()  # no pair: a zero, still in the graph
    else:
        total = (per_token * m).sum()
    loss = total / (max(loss_count(mask, norm, step_map), 1.0) if count is None else count)
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = (
            float((is_clipped.float() * m).sum() / n),
            float((kl * m).sum() / n),
            float((ratio * m).sum() / n),
        )
    return PolicyLoss(loss, *stats)
