"""Exact-count estimator of the masked diffusion NELBO (LLaDA / RADD "k-DCE"), docs/objectives.md#exact_count.

Draw ``k ~ U{1..L}``, mask exactly ``k`` uniformly chosen positions, score
``(L/k) · Σ_masked −log x_θ``. It has the expectation of the ``1/t`` estimator — both equal
``Σ_S (|S|−1)!(L−|S|)!/L! · Σ_{l∈S} −log p(x^l | x_{¬S})`` over mask sets ``S`` — with lower
variance, because the number of masked tokens is no longer random given k. ``k`` is
stratified across the global batch (``k_i = ⌊((u + i/G) mod 1)·L⌋ + 1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.model.modeling import logits_of
from dlm.schedules import sample_times
from dlm.train.objectives import OBJECTIVES
from dlm.train.objectives.common import LossOutput, subs_log_probs


def stratified_counts(n: int, length: int, generator: torch.Generator | None, stratified: bool = True) -> Tensor:
    """``n`` mask counts in ``1..length``, one per stratum when ``stratified``."""
    u = sample_times(n, generator, 0.0, stratified)
    return (u * length).floor().long().clamp(max=length - 1) + 1


def mask_exactly(scores_BL: Tensor, k_B: Tensor) -> Tensor:
    """Mask the ``k`` positions of each row with the smallest scores (a uniform k-subset for iid scores)."""
    ranks = scores_BL.argsort(dim=-1).argsort(dim=-1)
    return ranks < k_B[:, None]


class ExactCountObjective:
    name = "exact_count"
    bound = "nelbo"

    def __init__(self, mask_token_id: int, antithetic: bool = True, **_: object):
        self.mask_token_id, self.antithetic = mask_token_id, antithetic

    def sample_noise(
        self, shape: tuple[int, int], generator: torch.Generator, for_eval: bool = False
    ) -> dict[str, Tensor]:
        G, L = shape
        return {
            "k": stratified_counts(G, L, generator, self.antithetic),
            "scores": torch.rand(G, L, generator=generator),
        }

    def loss(self, model, batch: dict[str, Tensor], noise: dict[str, Tensor]) -> LossOutput:
        x0 = batch["input_ids"]
        B, L = x0.shape
        k = noise["k"].to(x0.device)
        masked = mask_exactly(noise["scores"].to(x0.device), k)
        zt = torch.where(masked, torch.full_like(x0, self.mask_token_id), x0)
        logits = logits_of(model(zt, attn_mode="bidirectional", output_mask=masked))
        nll = -subs_log_probs(logits, self.mask_token_id).gather(-1, x0[masked][:, None]).squeeze(-1)
        weight = (L / k.float())[:, None].expand_as(x0)[masked]
        return LossOutput(
            (weight * nll).sum(),
            torch.tensor(float(x0.numel()), device=x0.device),
        )


@OBJECTIVES.register("exact_count")
def build_exact_count(**kwargs) -> ExactCountObjective:
    return ExactCountObjective(**kwargs)
