"""Perplexity bounds on a dataset and generative quality of samples (docs/likelihoods.md).

    dlm ppl runs/quickstart --data stdlib --max-documents 50
    dlm ppl runs/quickstart --judge runs/quickstart-ar --num-samples 16 --gen-length 128

* Dataset mode: documents are tokenised with the checkpoint's tokenizer and packed into rows of
  ``--seq-len`` tokens (EOS between documents, as in training). A diffusion model gets the
  NELBO bound — the Monte-Carlo ELBO of every row (:func:`dlm.eval.likelihood.elbo`) — so the
  reported perplexity is an **upper bound**; a causal (AR) model gets its exact perplexity.
* Generative mode: samples from any decoder are scored by an AR judge (a dlm AR checkpoint or
  any transformers causal LM) — generative perplexity — *and* their unigram entropy is reported
  with it, always: low temperatures buy a low generative perplexity with repetitive text, which
  only the entropy shows.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn

from dlm.eval.likelihood import Request, elbo
from dlm.model.modeling import is_shifted, logits_of, next_token_logits


def is_causal(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "attention_mode", None) == "causal"


@torch.no_grad()
def causal_nll(model: nn.Module, rows: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """Sum of next-token NLLs and the number of predicted tokens (each row's first token is context)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    dlm_model = getattr(model, "supports_kv_cache", False)
    for start in range(0, len(rows), batch_size):
        chunk = [r for r in rows[start : start + batch_size] if len(r) > 1]
        if not chunk:
            continue
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        pad = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, r in enumerate(chunk):  # right padding: causal rows never see it
            ids[i, : len(r)], pad[i, : len(r)] = torch.tensor(r), 1
        ids, pad = ids.to(device), pad.to(device)
        kwargs = {"attn_mode": "causal"} if dlm_model else {"attention_mask": pad}
        logits = logits_of(model(input_ids=ids, **kwargs)).float()
        logp = torch.log_softmax(next_token_logits(logits, is_shifted(model)), dim=-1)
        logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        keep = pad[:, 1:].bool()
        total -= float(logp[keep].double().sum())
        count += int(keep.sum())
    return total, count


def dataset_perplexity(
    model: nn.Module, rows: Tensor, mask_id: int | None, mc_num: int = 32, batch_size: int = 32, seed: int = 0
) -> dict[str, float]:
    """Perplexity of packed rows ``[N, L]``: exact for causal models, the NELBO bound otherwise."""
    if is_causal(model):
        nll, n = causal_nll(model, rows.tolist(), batch_size)
        return {"perplexity": math.exp(nll / n), "bound": False, "tokens": n}
    if mask_id is None:
        raise ValueError("a diffusion model needs a mask_token_id in its config for the NELBO bound")
    reqs = [Request([], row) for row in rows.tolist()]
    scores = elbo(model, reqs, mask_id, mc_num, batch_size, seed=seed)
    total = sum(v for v, _ in scores)
    se = math.sqrt(sum(s * s for _, s in scores))
    n = rows.numel()
    return {
        "perplexity": math.exp(-total / n),
        "bound": True,
        "tokens": n,
        "nll_per_token": -total / n,
        "nll_per_token_stderr": se / n,
    }


def unigram_entropy(samples: list[list[int]]) -> float:
    """Mean over samples of the entropy (nats) of each sample's token frequencies."""
    values = []
    for tokens in samples:
        if not tokens:
            continue
        counts = Counter(tokens)
        n = len(tokens)
        values.append(-sum(c / n * math.log(c / n) for c in counts.values()))
    return sum(values) / len(values) if values else 0.0


def generative_perplexity(judge: nn.Module, judge_tok, texts: list[str], batch_size: int = 8) -> float:
    """Perplexity of ``texts`` under an AR judge (each text prefixed with the judge's BOS/EOS)."""
    prefix = judge_tok.bos_token_id if judge_tok.bos_token_id is not None else judge_tok.eos_token_id
    rows = [[prefix] + judge_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    nll, n = causal_nll(judge, rows, batch_size)
    if n == 0:
        raise ValueError("the samples are empty: nothing for the judge to score")
    return math.exp(nll / n)
