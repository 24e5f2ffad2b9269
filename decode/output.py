"""What every decoder returns, and helpers all decoders share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dlm.model.modeling import logits_of


@dataclass
class DecodeOutput:
    """What a decoder produced, in two views of the canvas.

    ``tokens`` is the *text* view: prompt followed by the generation, and in a row that finished
    at an EOS every position after that first EOS reads EOS, whether it was decoded (a block is
    finished as a whole, so tokens after the EOS in its block were decoded too) or never reached.
    ``canvas`` is the *history* view that ``step_map`` and ``logprobs`` describe: every decoded
    token at the value it was decoded with, including those after the first EOS, and the mask
    token at positions that were never decoded. RL rebuilds the states the model saw from
    ``canvas`` and ``step_map``; text, rewards and lm-eval read ``tokens``.
    """

    tokens: Tensor
    """[B, P + G] prompt followed by the generation (EOS after a finished row's first EOS)."""
    step_map: Tensor
    """[B, P + G] step at which each position was decoded; -1 for prompt, padding and never-decoded positions."""
    logprobs: Tensor
    """[B, P + G] float64 log-probability each token had when it was decoded; 0 elsewhere."""
    nfe: Tensor
    """[B] model evaluations each sequence needed."""
    model_calls: int
    """Batched forward passes actually run."""
    prompt_length: int
    history: list[Tensor] = field(default_factory=list)
    """Canvas after each step (when recorded), for replaying the unmasking order."""
    times: Tensor | None = None
    """[B, P + G] float64 diffusion time at which each position was unmasked (first-hitting sampler)."""
    canvas: Tensor | None = None
    """[B, P + G] decoded values and the mask token where never decoded; None (the default) means
    the same as ``tokens`` (a decoder that never fills), and is replaced by ``tokens``."""

    def __post_init__(self):
        if self.canvas is None:
            self.canvas = self.tokens

    @property
    def generated(self) -> Tensor:
        return self.tokens[:, self.prompt_length :]


def resolve_mask_token_id(model: nn.Module, mask_token_id: int | None) -> int:
    if mask_token_id is not None:
        return mask_token_id
    found = getattr(getattr(model, "config", None), "mask_token_id", None)
    if found is None:
        raise ValueError("no mask token id: the model config has no mask_token_id; pass mask_token_id to the decoder")
    return int(found)


def model_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Logits ``[B, T, V]`` from any model taking ``input_ids`` (and ``attention_mask``)."""
    if attention_mask is None:
        out = model(input_ids=input_ids)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    return logits_of(out)


def check_context(model: nn.Module, total_length: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and total_length > limit:
        raise ValueError(
            f"prompt + generation is {total_length} tokens, beyond the model's context of {limit}; "
            "shorten the prompt or lower gen_length"
        )


def left_pad_mask(prompt_ids: Tensor, attention_mask: Tensor | None, gen_length: int) -> Tensor | None:
    """Padding mask for the canvas [prompt ⊕ generation], or None when there is no padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    ones = torch.ones(prompt_ids.shape[0], gen_length, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([attention_mask, ones], dim=1)
