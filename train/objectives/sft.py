"""Conditional SFT for masked diffusion (LLaDA §2.3), SPEC §2.

The prompt is never masked; only answer tokens are noised and scored. Each sequence's loss is
``Σ_masked w(t)·(−log p) / answer_length`` and the batch loss is the mean over sequences.
Answers are padded with EOS up to the sequence length and the padding counts as answer
(LLaDA does this so the model learns where to stop); ``batch["loss_mask"]`` marks the answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.schedules import build_schedule, sample_times
from dlm.train.objectives import OBJECTIVES, LossOutput, logits_of, subs_log_probs


class SFTObjective:
    name = "sft"
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

    def sample_noise(self, shape: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
        G, L = shape
        return {
            "t": sample_times(G, generator, self.t_eps, self.antithetic),
            "u": torch.rand(G, L, generator=generator),
        }

    def loss(self, model, batch: dict[str, Tensor], noise: dict[str, Tensor]) -> LossOutput:
        x0, answer = batch["input_ids"], batch["loss_mask"].bool()
        t = noise["t"].to(x0.device)
        p_mask = (1 - self.schedule.alpha(t))[:, None]
        masked = (noise["u"].to(x0.device) < p_mask) & answer
        zt = torch.where(masked, torch.full_like(x0, self.mask_token_id), x0)
        logits = logits_of(model(zt, attn_mode="bidirectional", output_mask=masked))
        nll = -subs_log_probs(logits, self.mask_token_id).gather(-1, x0[masked][:, None]).squeeze(-1)
        answer_len = answer.sum(-1).clamp(min=1).float()  # [B]
        weight = (self.schedule.weight(t) / answer_len)[:, None].expand_as(x0)[masked]
        return LossOutput(
            (weight * nll).sum(),
            torch.tensor(float(x0.shape[0]), device=x0.device),
            {"mask_rate": (masked.sum() / answer.sum().clamp(min=1)).item()},
        )


@OBJECTIVES.register("sft")
def build_sft(**kwargs) -> SFTObjective:
    return SFTObjective(**kwargs)
