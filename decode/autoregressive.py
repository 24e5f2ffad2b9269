"""Left-to-right sampling for the AR baseline (the same backbone in causal mode)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.decode.output import DecodeOutput, check_context, left_pad_mask, model_logits
from dlm.decode.sampling import sample_categorical
from dlm.model.modeling import is_shifted


@dataclass(frozen=True)
class AutoregressiveDecoder:
    gen_length: int
    temperature: float = 1.0

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
        lps = []
        shifted = is_shifted(model)  # the next token's logits sit one column further: feed a placeholder
        for _ in range(self.gen_length):
            feed = torch.cat([x, x[:, -1:]], dim=1) if shifted else x
            pad = left_pad_mask(prompt_ids, attention_mask, feed.shape[1] - P) if P else None
            logits = model_logits(model, feed, pad)[:, -1]
            tok, lp = sample_categorical(logits, self.temperature, generator)
            x = torch.cat([x, tok[:, None].to(x.dtype)], dim=1)
            lps.append(lp)
        x = torch.cat([prompt_ids, x[:, start:]], dim=1)
        step_map = torch.full_like(x, -1)
        step_map[:, P:] = torch.arange(self.gen_length, device=x.device)
        logprobs = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        logprobs[:, P:] = torch.stack(lps, dim=1)
        nfe = torch.full((B,), self.gen_length, dtype=torch.long, device=x.device)
        return DecodeOutput(x, step_map, logprobs, nfe, self.gen_length, P)
