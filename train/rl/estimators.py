"""Log-probabilities of a rollout's tokens, estimated from *rows* (SPEC §6).

A rollout is the canvas ``tokens [B, T]`` (prompt ⊕ completion), its ``step_map [B, T]`` (the
decoding step of each completion token; −1 for prompt, padding and EOS fill) and the padding
mask. Every estimator turns rollouts into rows of one shape:

* ``inputs [R, T]`` — a masked copy of one rollout's canvas,
* ``targets [R, T]`` — the positions scored in that row,
* ``weights [R, T]`` — each target's weight,
* ``owner [R]`` — the rollout the row belongs to,

and :func:`token_logprobs` runs the rows (batched) and sums ``weight · log p`` per rollout token.

* ``trajectory`` (TraceRL): for each group of ``shrink`` consecutive decoding steps, the canvas
  as the model saw it at the group's first step (completion positions decoded at that step or
  later masked) scores the tokens decoded in the group. Rows are disjoint and cover every
  trainable token; ``shrink = 1`` reproduces the decode-time states exactly, so at temperature 1
  the row log-probs are the decode-time log-probs.
* ``one_step`` (diffu-GRPO, d1): one row per rollout — completion fully masked, each prompt
  token masked with probability ``p_mask`` (a new mask per call).
* ``coupled`` (coupled-GRPO, DiffuCoder): ``t ~ U(0.2, 0.8)``, a random mask ``m`` of the
  completion at rate ``t`` and its complement: two rows that partition the completion, weights
  ``1/t`` and ``1/(1 − t)``.

Positions filled with EOS after a finished row (step_map −1) are treated as masked in every
trajectory state and are never targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.registry import Registry
from dlm.train.objectives import logits_of, subs_log_probs


@dataclass
class Rollouts:
    tokens: Tensor  # [B, T]
    step_map: Tensor  # [B, T], -1 where not decoded
    prompt_length: int
    pad: Tensor | None = None  # [B, T] 1 = real token (left-padded prompts)

    @property
    def trainable(self) -> Tensor:
        return self.step_map >= 0


@dataclass
class Rows:
    inputs: Tensor  # [R, T]
    targets: Tensor  # [R, T] bool
    weights: Tensor  # [R, T] float
    owner: Tensor  # [R] long


ESTIMATORS: Registry = Registry("log-prob estimator")


def _completion_unfinished(r: Rollouts) -> Tensor:
    """Completion positions that were never decoded (EOS fill): masked in every state."""
    comp = torch.zeros_like(r.trainable)
    comp[:, r.prompt_length :] = True
    return comp & ~r.trainable


@ESTIMATORS.register("trajectory")
def trajectory_rows(r: Rollouts, mask_id: int, shrink: int = 1, generator=None) -> Rows:
    if shrink < 1:
        raise ValueError(f"shrink={shrink} must be >= 1 (1 = exact trajectory)")
    inputs, targets, owner = [], [], []
    fill = _completion_unfinished(r)
    for b in range(r.tokens.shape[0]):
        steps = torch.unique(r.step_map[b][r.trainable[b]]).tolist()  # ascending
        for k in range(0, len(steps), shrink):
            group = steps[k : k + shrink]
            masked = (r.step_map[b] >= group[0]) | fill[b]
            x = r.tokens[b].clone()
            x[masked] = mask_id
            inputs.append(x)
            targets.append((r.step_map[b] >= group[0]) & (r.step_map[b] <= group[-1]))
            owner.append(b)
    return _rows(inputs, targets, None, owner, r)


@ESTIMATORS.register("one_step")
def one_step_rows(r: Rollouts, mask_id: int, p_mask: float = 0.15, generator=None) -> Rows:
    B, T = r.tokens.shape
    prompt = torch.zeros_like(r.trainable)
    prompt[:, : r.prompt_length] = True
    if r.pad is not None:
        prompt &= r.pad.bool()
    hide_prompt = prompt & (torch.rand(B, T, generator=generator).to(r.tokens.device) < p_mask)
    completion = torch.zeros_like(prompt)
    completion[:, r.prompt_length :] = True
    x = r.tokens.clone()
    x[hide_prompt | completion] = mask_id
    return _rows(list(x), list(r.trainable), None, list(range(B)), r)


@ESTIMATORS.register("coupled")
def coupled_rows(r: Rollouts, mask_id: int, t_low: float = 0.2, t_high: float = 0.8, generator=None) -> Rows:
    B, T = r.tokens.shape
    t = t_low + (t_high - t_low) * torch.rand(B, generator=generator, dtype=torch.float64)
    u = torch.rand(B, T, generator=generator, dtype=torch.float64)
    m = (u < t[:, None]).to(r.tokens.device) & r.trainable
    fill = _completion_unfinished(r)
    inputs, targets, weights, owner = [], [], [], []
    for b in range(B):
        for part, w in ((m[b], 1.0 / float(t[b])), (r.trainable[b] & ~m[b], 1.0 / (1.0 - float(t[b])))):
            x = r.tokens[b].clone()
            x[part | fill[b]] = mask_id
            inputs.append(x)
            targets.append(part)
            weights.append(torch.where(part, w, 0.0))
            owner.append(b)
    return _rows(inputs, targets, weights, owner, r)


def _rows(inputs, targets, weights, owner, r: Rollouts) -> Rows:
    targets_t = torch.stack(targets).bool()
    w = torch.stack(weights).float() if weights is not None else targets_t.float()
    return Rows(torch.stack(inputs), targets_t, w, torch.tensor(owner, dtype=torch.long, device=r.tokens.device))


def build_rows(name: str, r: Rollouts, mask_id: int, generator=None, **kwargs) -> Rows:
    try:
        fn = ESTIMATORS.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return fn(r, mask_id, generator=generator, **kwargs)


def token_logprobs(model: nn.Module, r: Rollouts, rows: Rows, mask_id: int, batch_size: int = 16) -> Tensor:
    """``[B, T]``: Σ over rows of ``weight · log p(token)`` at each rollout position (0 elsewhere).

    Differentiable (no ``no_grad``): the policy loss backpropagates through it.
    """
    B, T = r.tokens.shape
    out = torch.zeros(B, T, dtype=torch.float32, device=r.tokens.device)
    dlm_model = getattr(model, "supports_output_mask", False)
    for start in range(0, rows.inputs.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        x, tgt, w, own = rows.inputs[sl], rows.targets[sl], rows.weights[sl], rows.owner[sl]
        pad = None if r.pad is None else r.pad[own]
        kwargs = {} if pad is None else {"attention_mask": pad}
        if dlm_model:
            logits = logits_of(model(input_ids=x, output_mask=tgt, **kwargs))
        else:
            logits = logits_of(model(input_ids=x, **kwargs))[tgt]
        clean = r.tokens[own][tgt]
        logp = subs_log_probs(logits, mask_id).gather(-1, clean[:, None]).squeeze(-1)
        rows_idx, cols = tgt.nonzero(as_tuple=True)
        out = out.index_put((own[rows_idx], cols), logp * w[tgt], accumulate=True)
    return out


def expected_rows(steps: int, shrink: int) -> int:
    return math.ceil(steps / shrink)
