"""MDLM: the continuous-time masked diffusion NELBO with SUBS (Sahoo et al., 2024), docs/objectives.md#mdlm.

    NELBO(x) = E_{t~U(ε,1)} E_{z_t} [ w(t) · Σ_{l: z_t^l = m} −log x_θ(z_t)^l[x^l] ],  w(t) = −α'_t/(1−α_t)

Zero-masking puts no mass on the mask token; carry-over copies clean positions, so they add
exactly 0 and the LM head is evaluated only on masked positions. Times are antithetic across
the global batch. The loss is reported per token (normalised by all L tokens of each row), so
``exp`` of it is an upper bound on perplexity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.model.modeling import logits_of
from dlm.schedules import Schedule, build_schedule, sample_times
from dlm.train.objectives import OBJECTIVES
from dlm.train.objectives.common import LossOutput, subs_log_probs


def mask_tokens(x0_BL: Tensor, p_mask_B1: Tensor, u_BL: Tensor, mask_token_id: int) -> tuple[Tensor, Tensor]:
    """Forward process: token l is masked iff ``u_l < p_mask``. Returns ``(z_t, is_masked)``."""
    masked = u_BL < p_mask_B1
    return torch.where(masked, torch.full_like(x0_BL, mask_token_id), x0_BL), masked


def mdlm_token_losses(
    logits_BLV: Tensor, x0_BL: Tensor, zt_BL: Tensor, t_B: Tensor, schedule: Schedule, mask_token_id: int
) -> Tensor:
    """Reference per-token NELBO terms ``[B, L]``: ``w(t)·(−log p)`` at masked positions, 0 elsewhere."""
    logp = subs_log_probs(logits_BLV, mask_token_id)
    nll = -logp.gather(-1, x0_BL[..., None]).squeeze(-1)  # [B, L]
    masked = zt_BL == mask_token_id
    return torch.where(masked, schedule.weight(t_B)[:, None] * nll, torch.zeros_like(nll))


class MDLMObjective:
    name = "mdlm"
    bound = "nelbo"

    def __init__(
        self,
        mask_token_id: int,
        schedule: str = "loglinear",
        schedule_args: dict | None = None,
        t_eps: float = 1e-3,
        antithetic: bool = True,
        **_: object,
    ):
        self.mask_token_id = mask_token_id
        self.schedule = build_schedule(schedule, **(schedule_args or {}))
        self.t_eps, self.antithetic = t_eps, antithetic

    def sample_noise(
        self, shape: tuple[int, int], generator: torch.Generator, for_eval: bool = False
    ) -> dict[str, Tensor]:
        G, L = shape
        return {
            "t": sample_times(G, generator, self.t_eps, self.antithetic),
            "u": torch.rand(G, L, generator=generator),
        }

    def loss(self, model, batch: dict[str, Tensor], noise: dict[str, Tensor]) -> LossOutput:
        x0 = batch["input_ids"]
        t = noise["t"].to(x0.device)
        p_mask = (1 - self.schedule.alpha(t))[:, None]  # [B, 1]
        zt, masked = mask_tokens(x0, p_mask, noise["u"].to(x0.device), self.mask_token_id)
        logits = logits_of(model(zt, attn_mode="bidirectional", output_mask=masked))  # [N, V]
        logp = subs_log_probs(logits, self.mask_token_id)
        nll = -logp.gather(-1, x0[masked][:, None]).squeeze(-1)  # [N]
        weight = self.schedule.weight(t)[:, None].expand_as(x0)[masked]
        total = (weight * nll).sum()
        return LossOutput(total, torch.tensor(float(x0.numel()), device=x0.device))


@OBJECTIVES.register("mdlm")
def build_mdlm(**kwargs) -> MDLMObjective:
    return MDLMObjective(**kwargs)
