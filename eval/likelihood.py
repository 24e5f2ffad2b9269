"""Likelihood bounds of a masked diffusion LM for evaluation (docs/likelihoods.md#the-bound).

A masked diffusion model has no exact likelihood; it has the ELBO

    log p(c | x) ≥ Σ_S (|S|−1)!(L−|S|)!/L! · Σ_{l∈S} log p_θ(c^l | x, c_{¬S})

over the mask sets ``S`` of the continuation ``c`` (``L`` tokens) with the context ``x`` clean.
:func:`elbo` estimates it by Monte Carlo:

* ``exact_count`` (default, LLaDA's estimator): draw ``k ∈ {1..L}`` — stratified over the
  ``mc_num`` samples — mask exactly ``k`` uniformly chosen positions, score ``(L/k) Σ log p``;
* ``one_over_t``: draw ``t ~ U(0,1)``, mask each position with probability ``t``, score
  ``(1/t) Σ log p`` (the MDLM training estimator; same mean, higher variance).

:func:`enumerate_elbo` computes the bound exactly by enumerating every mask set (tiny ``L``
only), which the estimators are tested against. Every sample is one row of a batched forward;
rows of many requests share batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor, nn

from dlm.model.modeling import logits_of, supports_output_mask
from dlm.train.objectives.common import subs_log_probs
from dlm.train.objectives.exact_count import stratified_counts
from dlm.utils import seed_of

ESTIMATORS = ("exact_count", "one_over_t")


@dataclass
class Request:
    """One likelihood query: ``context`` clean, ``target`` scored (token id lists)."""

    context: list[int]
    target: list[int]


def request_seed(seed: int, req: Request) -> int:
    """A seed from ``seed`` and the request's tokens (tuples of ints hash the same in every process)."""
    return seed_of(seed, tuple(req.context), tuple(req.target))


def _rows_for(req: Request, mc_num: int, estimator: str, mask_id: int, generator: torch.Generator):
    """``mc_num`` masked copies of ``context ⊕ target``: ids ``[n, T]``, masked ``[n, T]``, weights ``[n]``."""
    L, C = len(req.target), len(req.context)
    ids = torch.tensor(req.context + req.target).expand(mc_num, -1).clone()
    scores = torch.rand(mc_num, L, generator=generator)
    if estimator == "exact_count":
        k = stratified_counts(mc_num, L, generator)
        masked_t = scores.argsort(dim=-1).argsort(dim=-1) < k[:, None]
        weight = L / k.double()
    elif estimator == "one_over_t":
        t = torch.rand(mc_num, generator=generator, dtype=torch.float64).clamp(min=1e-6)
        masked_t = scores < t[:, None].float()
        weight = 1.0 / t
    else:
        raise ValueError(f"estimator={estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, C:] = masked_t
    targets = ids.clone()
    ids[masked] = mask_id
    return ids, targets, masked, weight


def _score_rows(model: nn.Module, rows: list[tuple[Tensor, Tensor, Tensor]], mask_id: int, device) -> list[Tensor]:
    """Σ log p of the masked targets for each row (one batched forward, left-padded)."""
    T = max(r[0].shape[0] for r in rows)
    B = len(rows)
    ids = torch.full((B, T), mask_id, dtype=torch.long)
    tgt = torch.zeros((B, T), dtype=torch.long)
    msk = torch.zeros((B, T), dtype=torch.bool)
    pad = torch.zeros((B, T), dtype=torch.long)
    for i, (x, y, m) in enumerate(rows):
        n = x.shape[0]
        ids[i, T - n :], tgt[i, T - n :], msk[i, T - n :], pad[i, T - n :] = x, y, m, 1
    ids, tgt, msk, pad = ids.to(device), tgt.to(device), msk.to(device), pad.to(device)
    kwargs = {} if bool(pad.all()) else {"attention_mask": pad}
    if supports_output_mask(model):
        logits = logits_of(model(input_ids=ids, output_mask=msk, **kwargs))  # [N, V]
        logp = subs_log_probs(logits, mask_id).gather(-1, tgt[msk][:, None]).squeeze(-1)
    else:
        logits = logits_of(model(input_ids=ids, **kwargs))
        logp = subs_log_probs(logits[msk], mask_id).gather(-1, tgt[msk][:, None]).squeeze(-1)
    per_row = torch.zeros(B, dtype=torch.float64, device=logp.device)
    per_row.index_add_(0, msk.nonzero()[:, 0], logp.double())
    return list(per_row.cpu())


@torch.no_grad()
def elbo(
    model: nn.Module,
    requests: list[Request],
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 32,
    estimator: str = "exact_count",
    seed: int = 0,
    progress=None,
) -> list[tuple[float, float]]:
    """Monte-Carlo ELBO of each request's target given its context: ``(estimate, standard error)``.

    Each request's masks are drawn from a generator seeded by ``seed`` and the request's tokens,
    so its estimate does not depend on which other requests share the call, the batch or the
    process (several lm-eval processes reproduce one).
    """
    if mc_num < 1:
        raise ValueError(f"mc_num={mc_num} must be >= 1")
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    pending: list[tuple[int, Tensor, Tensor, Tensor, float]] = []
    terms: list[list[float]] = [[] for _ in requests]

    def flush():
        if not pending:
            return
        sums = _score_rows(model, [(x, y, m) for _, x, y, m, _ in pending], mask_id, device)
        for (owner, *_rest, w), s in zip(pending, sums):
            terms[owner].append(float(s) * w)
        pending.clear()

    for i, req in enumerate(requests):
        if not req.target:
            continue
        generator = torch.Generator().manual_seed(request_seed(seed, req))
        ids, targets, masked, weight = _rows_for(req, mc_num, estimator, mask_id, generator)
        for j in range(mc_num):
            pending.append((i, ids[j], targets[j], masked[j], float(weight[j])))
            if len(pending) == batch_size:
                flush()
        if progress is not None:
            progress.update(1)
    flush()
    for req, t in zip(requests, terms):
        if not req.target:
            out.append((0.0, 0.0))
            continue
        x = torch.tensor(t, dtype=torch.float64)
        se = float(x.std(unbiased=True) / math.sqrt(len(t))) if len(t) > 1 else float("nan")
        out.append((float(x.mean()), se))
    return out


@torch.no_grad()
def enumerate_elbo(model: nn.Module, request: Request, mask_id: int) -> float:
    """The ELBO exactly, by enumerating all ``2^L − 1`` mask sets of the target (tiny L only)."""
    L, C = len(request.target), len(request.context)
    if L > 12:
        raise ValueError(f"enumerating mask sets of {L} tokens is too many; use elbo()")
    device = next(model.parameters()).device
    x = torch.tensor(request.context + request.target, device=device)
    total = 0.0
    for size in range(1, L + 1):
        coef = math.factorial(size - 1) * math.factorial(L - size) / math.factorial(L)
        for subset in combinations(range(L), size):
            z = x.clone()
            cols = torch.tensor([C + s for s in subset], device=device)
            z[cols] = mask_id
            logp = subs_log_probs(logits_of(model(input_ids=z[None]))[0, cols], mask_id)
            total += coef * float(logp.gather(-1, x[cols][:, None]).sum())
    return total
