"""Log-probabilities of a rollout's tokens, estimated from *rows* (docs/rl.md#rollouts-and-log-probability-rows).

A rollout is the decoded canvas ``tokens [B, T]`` (prompt ⊕ completion as the decoder left it:
``DecodeOutput.canvas``, not the EOS-filled text view), its ``step_map [B, T]`` (the decoding step
of each completion token; −1 for prompt, padding and positions never decoded) and the padding
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

Completion positions a finished row never decoded (step_map −1) were masked at every step the
model saw, so they are masked in every state and are never targets. Tokens decoded after a
completion's first EOS keep their decoded values and steps, as the model saw them.

Block-causal models (BD3-LM, ``block_size`` given): the decoder left-pads each prompt so the
generation starts on a model-block boundary, and the rows do the same (``Rows.offset``) so every
row sees the blocks the decoder saw. When each decoding step stays inside one model block (the
decoder's block length equals the model's), the trajectory is *vectorised over blocks* as in
BD3-LM training: row ``g`` is ``[z ⊕ x]`` (``Rows.paired``) whose noisy half holds every block at
the state before its own ``g``-th step group and whose clean half is the finished canvas, under
the BD3-LM mask — one forward of length ``2L`` scores the ``g``-th group of *every* block, so a
rollout needs ``max_b ⌈steps_b / s⌉`` rows instead of ``Σ_b ⌈steps_b / s⌉``. The noisy block sees
exactly what the decoder saw (itself and the clean earlier blocks), so ``s = 1`` still reproduces
the decode-time log-probs. Otherwise (a decoder block spanning several model blocks) the rows are
the per-step canvases on the aligned layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.model.masks import bd3lm_matrix
from dlm.model.modeling import logits_of, supports_output_mask
from dlm.registry import Registry
from dlm.train.objectives.common import paired_logits_from, subs_log_probs


@dataclass
class Rollouts:
    tokens: Tensor  # [B, T]
    step_map: Tensor  # [B, T], -1 where not decoded
    prompt_length: int
    pad: Tensor | None = None  # [B, T] 1 = real token (left-padded prompts)

    @property
    def trainable(self) -> Tensor:
        return self.step_map >= 0

    def select(self, rows: slice) -> Rollouts:
        return Rollouts(
            self.tokens[rows], self.step_map[rows], self.prompt_length, None if self.pad is None else self.pad[rows]
        )


@dataclass
class Rows:
    inputs: Tensor  # [R, T'] (T' = offset + T, or twice that when paired)
    targets: Tensor  # [R, T'] bool
    weights: Tensor  # [R, T'] float
    owner: Tensor  # [R] long
    offset: int = 0
    """Alignment columns prepended to each rollout canvas (a block-causal model's block boundary)."""
    paired: bool = False
    """Rows are ``[z ⊕ x]`` scored under the BD3-LM mask (vectorised block-causal trajectory)."""
    block_size: int | None = None


ESTIMATORS: Registry = Registry("log-prob estimator")


def _completion_unfinished(r: Rollouts) -> Tensor:
    """Completion positions that were never decoded (a finished row): masked in every state."""
    comp = torch.zeros_like(r.trainable)
    comp[:, r.prompt_length :] = True
    return comp & ~r.trainable


@ESTIMATORS.register("trajectory")
def trajectory_rows(
    r: Rollouts, mask_id: int, shrink: int = 1, generator=None, block_size: int | None = None, vectorise: bool = True
) -> Rows:
    """Trajectory rows; ``block_size`` = the model's block size when it is block-causal."""
    if shrink < 1:
        raise ValueError(f"shrink={shrink} must be >= 1 (1 = exact trajectory)")
    offset = (-r.prompt_length) % block_size if block_size else 0
    tokens, step_map, fill = _aligned(r, mask_id, offset)
    if block_size and vectorise and _blockwise(step_map, block_size):
        return _paired_trajectory_rows(tokens, step_map, fill, r, mask_id, shrink, block_size, offset)
    inputs, targets, owner = [], [], []
    for b in range(tokens.shape[0]):
        steps = torch.unique(step_map[b][step_map[b] >= 0]).tolist()  # ascending
        for k in range(0, len(steps), shrink):
            group = steps[k : k + shrink]
            masked = (step_map[b] >= group[0]) | fill[b]
            inputs.append(tokens[b].masked_fill(masked, mask_id))
            targets.append((step_map[b] >= group[0]) & (step_map[b] <= group[-1]))
            owner.append(b)
    return _rows(inputs, targets, None, owner, r, offset=offset, block_size=block_size)


def _aligned(r: Rollouts, mask_id: int, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """``tokens``, ``step_map`` and EOS-fill mask with ``offset`` alignment columns on the left."""
    fill = _completion_unfinished(r)
    if not offset:
        return r.tokens, r.step_map, fill
    B = r.tokens.shape[0]
    return (
        torch.cat([r.tokens.new_full((B, offset), mask_id), r.tokens], 1),
        torch.cat([r.step_map.new_full((B, offset), -1), r.step_map], 1),
        torch.cat([fill.new_zeros((B, offset)), fill], 1),
    )


def _blockwise(step_map: Tensor, block_size: int) -> bool:
    """Every decoding step's tokens lie in one model block, and blocks are decoded in order."""
    for row in step_map:
        cols = (row >= 0).nonzero().squeeze(-1)
        if not len(cols):
            continue
        order = torch.argsort(row[cols], stable=True)
        steps, blocks = row[cols][order], (cols // block_size)[order]
        if bool((blocks[1:] < blocks[:-1]).any()):
            return False
        same_step = steps[1:] == steps[:-1]
        if bool((same_step & (blocks[1:] != blocks[:-1])).any()):
            return False
    return True


def _paired_trajectory_rows(tokens, step_map, fill, r: Rollouts, mask_id, shrink, block_size, offset) -> Rows:
    B, L = tokens.shape
    clean = tokens.masked_fill(fill, mask_id)
    block_of = torch.arange(L, device=tokens.device) // block_size
    inputs, targets, owner = [], [], []
    for b in range(B):
        # rank of each token's step within its own block, then its group of `shrink`
        group = torch.full((L,), -1, dtype=torch.long, device=tokens.device)
        for j in torch.unique(block_of[step_map[b] >= 0]).tolist():
            cols = (block_of == j) & (step_map[b] >= 0)
            steps = torch.unique(step_map[b][cols])  # ascending
            group[cols] = torch.searchsorted(steps, step_map[b][cols]) // shrink
        for g in range(int(group.max()) + 1):  # group ranks; none (max -1) when nothing was decoded
            # a block's state before its g-th group: tokens of groups >= g (and EOS fill) masked
            noisy = clean[b].masked_fill((group >= g) | fill[b], mask_id)
            inputs.append(torch.cat([noisy, clean[b]]))
            targets.append(torch.cat([group == g, torch.zeros_like(group, dtype=torch.bool)]))
            owner.append(b)
    return _rows(inputs, targets, None, owner, r, offset=offset, paired=True, block_size=block_size)


@ESTIMATORS.register("one_step")
def one_step_rows(
    r: Rollouts, mask_id: int, p_mask: float = 0.15, generator=None, block_size: int | None = None
) -> Rows:
    B, T = r.tokens.shape
    prompt = torch.zeros_like(r.trainable)
    prompt[:, : r.prompt_length] = True
    if r.pad is not None:
        prompt &= r.pad.bool()
    # one draw per real prompt token, row by row: the masks do not depend on how much left padding
    # the batch has (so N processes draw what one process would)
    hide_prompt = torch.zeros_like(prompt)
    for b in range(B):
        cols = prompt[b].nonzero().squeeze(-1)
        hide_prompt[b, cols] = torch.rand(len(cols), generator=generator).to(r.tokens.device) < p_mask
    completion = torch.zeros_like(prompt)
    completion[:, r.prompt_length :] = True
    x = r.tokens.masked_fill(hide_prompt | completion, mask_id)
    # a block-causal model reads the (prompt-masked) canvas as its clean earlier blocks
    clean = r.tokens.masked_fill(hide_prompt | _completion_unfinished(r), mask_id)
    return _layout(list(x), list(r.trainable), None, list(range(B)), r, mask_id, block_size, list(clean))


@ESTIMATORS.register("coupled")
def coupled_rows(
    r: Rollouts, mask_id: int, t_low: float = 0.2, t_high: float = 0.8, generator=None, block_size: int | None = None
) -> Rows:
    B, T = r.tokens.shape
    t = t_low + (t_high - t_low) * torch.rand(B, generator=generator, dtype=torch.float64)
    u = torch.ones(B, T, dtype=torch.float64)  # drawn over the completion only: padding-invariant
    u[:, r.prompt_length :] = torch.rand(B, T - r.prompt_length, generator=generator, dtype=torch.float64)
    m = (u < t[:, None]).to(r.tokens.device) & r.trainable
    fill = _completion_unfinished(r)
    inputs, targets, weights, owner = [], [], [], []
    for b in range(B):
        for part, w in ((m[b], 1.0 / float(t[b])), (r.trainable[b] & ~m[b], 1.0 / (1.0 - float(t[b])))):
            inputs.append(r.tokens[b].masked_fill(part | fill[b], mask_id))
            targets.append(part)
            weights.append(torch.where(part, w, 0.0))
            owner.append(b)
    clean = r.tokens.masked_fill(fill, mask_id)
    return _layout(inputs, targets, weights, owner, r, mask_id, block_size, [clean[b] for b in owner])


def _layout(inputs, targets, weights, owner, r: Rollouts, mask_id: int, block_size: int | None, clean) -> Rows:
    """Rows on the canvas as is, or, for a block-causal model, aligned to its blocks and paired
    ``[noisy ⊕ clean]`` so every block reads clean earlier blocks, as in BD3-LM training."""
    if not block_size:
        return _rows(inputs, targets, weights, owner, r)
    offset = (-r.prompt_length) % block_size
    left = lambda v, x: torch.cat([v.new_full((offset,), x), v])  # noqa: E731
    inputs = [torch.cat([left(x, mask_id), left(c, mask_id)]) for x, c in zip(inputs, clean)]
    noisy_half = lambda v, x: torch.cat([left(v, x), torch.zeros_like(left(v, x))])  # noqa: E731  (clean half unscored)
    targets = [noisy_half(t, False) for t in targets]
    if weights is not None:
        weights = [noisy_half(w, 0.0) for w in weights]
    return _rows(inputs, targets, weights, owner, r, offset=offset, paired=True, block_size=block_size)


def _rows(inputs, targets, weights, owner, r: Rollouts, **layout) -> Rows:
    if not inputs:  # nothing decoded: no rows
        width = r.tokens.shape[1] + layout.get("offset", 0)
        width *= 2 if layout.get("paired") else 1
        empty = r.tokens.new_zeros((0, width))
        return Rows(empty, empty.bool(), empty.float(), r.tokens.new_zeros(0), **layout)
    targets_t = torch.stack(targets).bool()
    w = torch.stack(weights).float() if weights is not None else targets_t.float()
    owner_t = torch.tensor(owner, dtype=torch.long, device=r.tokens.device)
    return Rows(torch.stack(inputs), targets_t, w, owner_t, **layout)


def concat_rows(parts: list[Rows], sizes: list[int]) -> Rows:
    """Rows of consecutive rollout slices (``sizes[i]`` rollouts each) as one set."""
    first = parts[0]
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0).tolist()
    return Rows(
        torch.cat([p.inputs for p in parts]),
        torch.cat([p.targets for p in parts]),
        torch.cat([p.weights for p in parts]),
        torch.cat([p.owner + start for p, start in zip(parts, starts)]),
        first.offset,
        first.paired,
        first.block_size,
    )


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
    dlm_model = supports_output_mask(model)
    tokens, _, _ = _aligned(r, mask_id, rows.offset)
    pad = r.pad if r.pad is not None else (torch.ones_like(r.tokens) if rows.offset else None)
    if pad is not None and rows.offset:
        pad = torch.cat([pad.new_zeros((B, rows.offset)), pad], 1)
    L = tokens.shape[1]
    if rows.paired:
        structure = bd3lm_matrix(L, rows.block_size, tokens.device)
        tokens = torch.cat([tokens, tokens], 1)
    for start in range(0, rows.inputs.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        x, tgt, w, own = rows.inputs[sl], rows.targets[sl], rows.weights[sl], rows.owner[sl]
        kwargs = {} if pad is None else {"attention_mask": pad[own]}
        if rows.paired:  # [z ⊕ x]: both halves at the canvas's RoPE positions, padding keys hidden
            p = pad[own].bool() if pad is not None else torch.ones_like(x[:, :L], dtype=torch.bool)
            positions = (p.long().cumsum(-1) - 1).clamp(min=0)
            kwargs = {
                "attention_mask": structure[None, None] & torch.cat([p, p], 1)[:, None, None, :],
                "position_ids": torch.cat([positions, positions], 1),
                **paired_logits_from(model, L, rows.block_size, tokens.device),
            }
        if dlm_model:
            logits = logits_of(model(input_ids=x, output_mask=tgt, **kwargs))
        else:
            logits = logits_of(model(input_ids=x, **kwargs))[tgt]
        clean = tokens[own][tgt]
        logp = subs_log_probs(logits, mask_id).gather(-1, clean[:, None]).squeeze(-1)
        rows_idx, cols = tgt.nonzero(as_tuple=True)
        cols = cols % L - rows.offset
        out = out.index_put((own[rows_idx], cols), logp * w[tgt], accumulate=True)
    return out


def expected_rows(steps: int, shrink: int) -> int:
    return math.ceil(steps / shrink)
