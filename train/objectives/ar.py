"""Autoregressive baseline: next-token cross-entropy on the same backbone in causal mode.

Used for fair comparisons (the MDLM/AR perplexity ratio in docs/objectives.md#reference-numbers) and later as a
generative-perplexity judge. Each row of L tokens scores its L−1 next-token predictions;
``exp`` of the loss is the exact perplexity (``bound = "nll"``). A ``loss_mask`` in the batch
(SFT data) restricts scoring to answer tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.model.modeling import is_shifted, logits_of, next_token_logits
from dlm.train.objectives import OBJECTIVES
from dlm.train.objectives.common import LossOutput


def next_token_nll(logits_BLV: Tensor, x_BL: Tensor, shifted: bool = False) -> Tensor:
    """``[B, L-1]`` NLL of token l+1 given tokens ≤ l (``shifted``: the model's logits at l+1 hold it)."""
    logp = torch.log_softmax(next_token_logits(logits_BLV, shifted).float(), dim=-1)
    return -logp.gather(-1, x_BL[:, 1:, None]).squeeze(-1)


class ARObjective:
    name = "ar"
    bound = "nll"
    attention = ("causal", None)

    def __init__(self, **_: object):
        pass

    def sample_noise(
        self, shape: tuple[int, int], generator: torch.Generator, for_eval: bool = False
    ) -> dict[str, Tensor]:
        return {}

    def loss(self, model, batch: dict[str, Tensor], noise: dict[str, Tensor]) -> LossOutput:
        x = batch["input_ids"]
        scored = torch.ones_like(x[:, 1:], dtype=torch.bool)
        if "loss_mask" in batch:
            scored = batch["loss_mask"][:, 1:].bool()
        logits = logits_of(model(x, attn_mode="causal"))
        nll = next_token_nll(logits, x, is_shifted(model))
        return LossOutput((nll * scored).sum(), scored.sum().float())


@OBJECTIVES.register("ar")
def build_ar(**kwargs) -> ARObjective:
    return ARObjective(**kwargs)
