"""Ancestral sampling for masked diffusion (MDLM, Sahoo et al., 2024), SPEC §3.

Times ``1 = t_N > … > t_0 = 0`` on a uniform grid. From ``t`` to ``s`` each still-masked
token unmasks with probability ``(α_s − α_t) / (1 − α_t)``, taking its value from
``x_θ(z_t)`` (SUBS: never the mask token); decoded tokens are never re-masked.

No-change cache: the model has no time input, so its output depends only on the canvas.
Whether a token unmasks does not depend on the model, so the decision is drawn first and
the model is called only at steps where some token unmasks *and* the canvas changed since
the last call. Under the linear schedule each token unmasks at a uniform step, so the
expected number of calls is ``N·(1 − (1 − 1/N)^L)`` rather than ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.decode.output import DecodeOutput, check_context, left_pad_mask, model_logits, resolve_mask_token_id
from dlm.decode.sampling import sample_categorical
from dlm.schedules import build_schedule


@dataclass(frozen=True)
class AncestralDecoder:
    gen_length: int
    steps: int
    mask_token_id: int | None = None
    schedule: str = "loglinear"
    schedule_eps: float = 0.0
    temperature: float = 1.0
    record_history: bool = False

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.gen_length < 1:
            raise ValueError(f"gen_length={self.gen_length} must be >= 1")

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DecodeOutput:
        mask_id = resolve_mask_token_id(model, self.mask_token_id)
        B, P = prompt_ids.shape
        check_context(model, P + self.gen_length)
        device = prompt_ids.device
        x = torch.cat([prompt_ids, torch.full((B, self.gen_length), mask_id, dtype=prompt_ids.dtype, device=device)], 1)
        pad = left_pad_mask(prompt_ids, attention_mask, self.gen_length)
        generation = torch.zeros_like(x, dtype=torch.bool)
        generation[:, P:] = True
        step_map = torch.full_like(x, -1)
        logprobs = torch.zeros(x.shape, dtype=torch.float64, device=device)
        nfe = torch.zeros(B, dtype=torch.long, device=device)
        sched = build_schedule(self.schedule, **({} if self.schedule == "polynomial" else {"eps": self.schedule_eps}))
        times = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        history: list[Tensor] = []
        logits = None
        stale = torch.ones(B, dtype=torch.bool, device=device)  # row changed since the last batched call
        unseen = torch.ones(B, dtype=torch.bool, device=device)  # row changed since it last used logits
        calls = 0
        for i in range(self.steps):
            a_t, a_s = sched.alpha(times[i]), sched.alpha(times[i + 1])
            p_unmask = 1.0 if i == self.steps - 1 else float((a_s - a_t) / (1 - a_t))
            masked = generation & (x == mask_id)
            u = torch.rand(x.shape, dtype=torch.float64, generator=generator).to(device)
            unmask = masked & (u < p_unmask)
            rows = unmask.any(dim=1)
            if not rows.any():
                continue
            if logits is None or bool((stale & rows).any()):
                logits = model_logits(model, x, pad).clone()
                logits[..., mask_id] = float("-inf")
                stale.zero_()
                calls += 1
            nfe += (rows & unseen).long()  # what each row would cost decoded on its own
            unseen &= ~rows
            tokens, lp = sample_categorical(logits[unmask], self.temperature, generator)
            x[unmask] = tokens.to(x.dtype)
            step_map[unmask] = i
            logprobs[unmask] = lp
            stale |= rows
            unseen |= rows
            if self.record_history:
                history.append(x.clone())
        return DecodeOutput(x, step_map, logprobs, nfe, calls, P, history)
