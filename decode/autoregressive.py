"""Left-to-right sampling for the AR baseline (the same backbone in causal mode).

A dlm model decodes over its KV cache: the prompt is fed once, then each step feeds only the
newest token (a logit-shifted model also feeds the column after it, whose logits score the next
token) and attends to the cached keys and values. A model without a KV cache re-runs the whole
prefix every step; ``use_cache=False`` forces that path, the reference the cached one is tested
against (same tokens, same log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.decode.output import DecodeOutput, check_context, left_pad_mask, model_logits
from dlm.decode.sampling import sample_categorical
from dlm.model.cache import KVCache
from dlm.model.modeling import is_shifted, logits_of


@dataclass(frozen=True)
class AutoregressiveDecoder:
    gen_length: int
    temperature: float = 1.0
    use_cache: bool = True
    """Decode over the model's KV cache (models that have one); False re-runs the prefix each step."""

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DecodeOutput:
        B, P = prompt_ids.shape
        check_context(model, P + self.gen_length)
        x = prompt_ids
        if P == 0:  # start from EOS, the document separator the model was trained on
            eos = getattr(model.config, "eos_token_id", None)
            x = torch.full((B, 1), 0 if eos is None else int(eos), dtype=torch.long, device=prompt_ids.device)
        start = x.shape[1]
        canvas = torch.cat([x, x.new_zeros(B, self.gen_length)], dim=1)  # [B, start + gen]
        pad = left_pad_mask(prompt_ids, attention_mask, self.gen_length) if P else None
        step = self._cached if self.use_cache and getattr(model, "supports_kv_cache", False) else self._recomputed
        lps = []
        for t, logits in enumerate(step(model, canvas, start, pad)):  # logits [B, V] of column start + t
            tok, lp = sample_categorical(logits, self.temperature, generator)
            canvas[:, start + t] = tok
            lps.append(lp)
        x = torch.cat([prompt_ids, canvas[:, start:]], dim=1)
        step_map = torch.full_like(x, -1)
        step_map[:, P:] = torch.arange(self.gen_length, device=x.device)
        logprobs = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        logprobs[:, P:] = torch.stack(lps, dim=1)
        nfe = torch.full((B,), self.gen_length, dtype=torch.long, device=x.device)
        return DecodeOutput(x, step_map, logprobs, nfe, self.gen_length, P)

    def _recomputed(self, model: nn.Module, canvas: Tensor, start: int, pad: Tensor | None):
        """Next-token logits from a forward over the whole prefix (the reference path)."""
        shifted = is_shifted(model)  # the next token's logits sit one column further: feed a placeholder
        for t in range(self.gen_length):
            end = start + t + (1 if shifted else 0)  # columns [0, end) are fed
            yield model_logits(model, canvas[:, :end], _cut(pad, end))[:, -1]

    def _cached(self, model: nn.Module, canvas: Tensor, start: int, pad: Tensor | None):
        """Next-token logits over a KV cache: the prefix once, then one new column per token."""
        B, T = canvas.shape
        shifted = is_shifted(model)
        cache = KVCache.for_model(model, B, T)
        lo = 0
        for t in range(self.gen_length):
            hi = start + t + (1 if shifted else 0)  # feed columns [lo, hi); the last one's logits score start + t
            slots = torch.arange(lo, hi, device=canvas.device).expand(B, -1)
            keep = torch.zeros(B, hi - lo, dtype=torch.bool, device=canvas.device)
            keep[:, -1] = True
            out = model(
                input_ids=canvas[:, lo:hi], attention_mask=pad, cache=cache, cache_slots=slots, output_mask=keep
            )
            yield logits_of(out).reshape(B, -1)
            lo = hi - 1 if shifted else hi  # next: the newest token (shifted: re-fed, its slot held the placeholder)


def _cut(pad: Tensor | None, end: int) -> Tensor | None:
    return None if pad is None else pad[:, :end]
