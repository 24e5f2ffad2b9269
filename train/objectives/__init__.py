"""Training objectives behind one interface, chosen by name (``objective: mdlm``).

An objective is built from the recipe and exposes:

* ``sample_noise(shape, generator) -> dict[str, Tensor]`` — all randomness for a *global*
  batch of shape ``[G, L]`` (leading dim ``G``). The training loop draws it identically on
  every rank from a per-step seed and slices out the rows each rank owns, so a run on N
  processes sees exactly the noise a single process would with the same global batch, and a
  resumed run sees exactly the noise of an uninterrupted one.
  ``for_eval=True`` asks for the noise of the reported bound (BD3-LM trains on clipped mask
  rates but reports the unclipped NELBO).
* ``attention`` (optional): ``(mode, block_size)`` the trained model decodes with; default
  bidirectional.
* ``loss(model, batch, noise) -> LossOutput`` — ``total`` (summed loss) and ``count`` (its
  normaliser); the loop optimises ``total / count`` and validation reports
  ``exp(Σ total / Σ count)`` — for diffusion objectives the NELBO perplexity bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from dlm.model.modeling import is_shifted, logits_of, next_token_logits  # noqa: F401  (re-exported for objectives)
from dlm.registry import Registry


@dataclass
class LossOutput:
    total: Tensor  # summed loss over the micro-batch (scalar)
    count: Tensor  # normaliser (tokens, or sequences for SFT)


class Objective(Protocol):
    name: str
    #: "nelbo" (a perplexity upper bound) or "nll" (exact, AR)
    bound: str

    def sample_noise(
        self, shape: tuple[int, int], generator: torch.Generator, for_eval: bool = False
    ) -> dict[str, Tensor]: ...
    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor], noise: dict[str, Tensor]) -> LossOutput: ...


OBJECTIVES: Registry[Callable[..., Objective]] = Registry("objective")


def build_objective(name: str, **kwargs: Any) -> Objective:
    from dlm.config import ConfigError

    # Import the built-ins so they register themselves.
    from dlm.train.objectives import ar, bd3lm, exact_count, mdlm, sft  # noqa: F401

    try:
        factory = OBJECTIVES.get(name)
    except KeyError as exc:
        raise ConfigError(f"objective: {exc.args[0]}") from None
    return factory(**kwargs)


def subs_log_probs(logits: Tensor, mask_token_id: int) -> Tensor:
    """SUBS zero-masking: the model never predicts the mask token; float32 log-softmax."""
    is_mask = torch.arange(logits.shape[-1], device=logits.device) == mask_token_id
    return torch.log_softmax(logits.float().masked_fill(is_mask, float("-inf")), dim=-1)  # never in place


def paired_logits_from(model: torch.nn.Module, seq_len: int, block_size: int, device) -> dict[str, Tensor]:
    """Forward kwargs for ``[z_t ⊕ x]`` rows: a shifted model reads each block's first logits from
    the clean previous token (:func:`dlm.model.masks.bd3lm_logits_from`); others need nothing."""
    if not is_shifted(model):
        return {}
    from dlm.model.masks import bd3lm_logits_from

    return {"logits_from": bd3lm_logits_from(seq_len, block_size, device)}
