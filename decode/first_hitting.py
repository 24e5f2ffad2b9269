"""First-hitting sampler (FHS; Zheng et al., 2024), docs/decoders.md#first-hitting-sampler: exact simulation of the
continuous-time reverse chain of masked diffusion.

With ``n`` masked tokens at time ``τ``, the next unmasking time is
``τ' = α⁻¹(1 − u^{1/n}(1 − α_τ))`` (linear schedule: ``τ' = τ·u^{1/n}``). Exactly one masked
position, chosen uniformly at random, unmasks then, its token drawn from ``x_θ``. A sequence of
``L`` masked tokens takes exactly ``L`` model calls and wastes none. For a model without a time
input the times do not change the tokens; they are still recorded (``DecodeOutput.times``).

``tokens_per_call = k > 1`` is the faster, approximate variant: k positions unmask per call
(at k successive first-hitting times) from the same model output. ``steps`` is not used:
the number of calls is ``ceil(L / k)`` per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.decode import DECODERS
from dlm.decode.blocks import BlockState, DecodeConfig, sample_at, schedule_of
from dlm.decode.sampling import uniforms


class FirstHittingPolicy:
    def __init__(self, cfg: FirstHittingDecoder):
        self.cfg = cfg
        self.schedule = schedule_of(cfg.schedule, cfg.schedule_eps)
        self.last_times: Tensor | None = None
        self.tau: Tensor | None = None  # [B] float64 current time of each row in its block

    def start_block(self, masked: Tensor, steps: int, generator) -> int:
        self.tau = torch.ones(masked.shape[0], dtype=torch.float64, device=masked.device)  # each block starts at t=1
        most = int(masked.sum(dim=1).max())
        return -(-most // self.cfg.tokens_per_call)

    def reindex(self, index: Tensor) -> None:
        """Rows follow ``index`` (resampled particles keep their current time)."""
        if self.tau is not None:
            self.tau = self.tau[index.to(self.tau.device)]

    def step(self, state: BlockState, generator) -> tuple[Tensor, Tensor, Tensor]:
        masked = state.masked
        B, Tb = masked.shape
        k = self.cfg.tokens_per_call
        # k uniformly chosen masked positions per row: the k largest of iid uniform scores
        scores = uniforms(B * Tb, generator, masked.device).view(B, Tb).masked_fill(~masked, -1.0)
        order = scores.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        n = masked.sum(dim=1)
        decode = masked & (rank < k)
        # successive first-hitting times for the chosen positions, in the order they unmask
        times = torch.full((B, Tb), float("nan"), dtype=torch.float64, device=masked.device)
        u = uniforms(B * k, generator, masked.device).view(B, k)
        for j in range(k):
            left = (n - j).clamp(min=1).double()
            alpha_next = 1 - u[:, j] ** (1 / left) * (1 - self.schedule.alpha(self.tau))
            tau_next = self.schedule.alpha_inverse(alpha_next).clamp(0.0, 1.0)
            active = n > j
            self.tau = torch.where(active, tau_next, self.tau)
            times = torch.where((rank == j) & masked & active[:, None], self.tau[:, None], times)
        self.last_times = times
        return (decode, *sample_at(state, decode, self.cfg, generator))


@DECODERS.register("first_hitting")
@dataclass(frozen=True)
class FirstHittingDecoder(DecodeConfig):
    tokens_per_call: int = 1
    """1 = exact FHS; k > 1 unmasks k positions per model call (faster, approximate)."""
    schedule: str = "loglinear"
    schedule_eps: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.tokens_per_call < 1:
            raise ValueError(f"tokens_per_call={self.tokens_per_call} must be >= 1")

    def make_policy(self) -> FirstHittingPolicy:
        return FirstHittingPolicy(self)
