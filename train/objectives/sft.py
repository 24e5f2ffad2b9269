"""Conditional SFT for masked diffusion (LLaDA §2.3), docs/objectives.md#sft.

The prompt is never masked; only answer tokens are noised and scored. Each sequence's loss is
``Σ_masked w(t)·(−log p) / answer_length`` and the batch loss is the mean over sequences.
Answers are padded with EOS up to the sequence length and the padding counts as answer
(LLaDA does this so the model learns where to stop); ``batch["loss_mask"]`` marks the answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.model.modeling import logits_of
from dlm.train.objectives import OBJECTIVES
from dlm.train.objectives.common import LossOutput, subs_log_probs
from dlm.train.objectives.mdlm import MDLMObjective


class SFTObjective(MDLMObjective):
    """MDLM's schedule and time sampling; the loss conditions on the clean prompt."""

    name = "sft"
    bound = "nelbo"

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
        )


@OBJECTIVES.register("sft")
def build_sft(**kwargs) -> SFTObjective:
    return SFTObjective(**kwargs)
