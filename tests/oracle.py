"""An oracle denoiser from a known joint over short sequences: the exact conditional marginals
given the unmasked tokens. Samplers that are exact reproduce the joint; guided samplers its tilt."""

import itertools
import math

import torch
from torch import nn

V, L, MASK = 4, 4, 4  # oracle: 4 real tokens, mask id 4


def make_joint(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A strongly correlated joint over all V^L sequences: (sequences [S, L], probabilities [S])."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=L)))
    g = torch.Generator().manual_seed(seed)
    energy = torch.randn(len(seqs), generator=g, dtype=torch.float64)
    energy += 2.0 * (seqs[:, 1:] == seqs[:, :-1]).sum(-1)  # neighbours like to agree
    return seqs, torch.softmax(energy, 0)


class Oracle(nn.Module):
    """Logits = log of the exact conditional marginals of the joint given the unmasked tokens.

    Only (V+1)^L = 625 canvases exist, so every answer is computed once up front."""

    def __init__(self, seqs, probs):
        super().__init__()
        canvases = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # [625, L]
        match = ((canvases[:, None, :] == seqs[None]) | (canvases[:, None, :] == MASK)).all(-1)  # [625, S]
        w = match.double() * probs[None]
        marg = torch.einsum("cs,slv->clv", w, torch.nn.functional.one_hot(seqs, V).double())
        marg = marg / marg.sum(-1, keepdim=True)
        self.table = torch.cat([marg.log(), torch.full((*marg.shape[:2], 1), -1e9, dtype=torch.float64)], -1).float()
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        x = input_ids[:, -L:]
        return self.table[(x * ((V + 1) ** torch.arange(L - 1, -1, -1))).sum(-1)]


def empirical(tokens: torch.Tensor) -> torch.Tensor:
    idx = (tokens[:, -L:] * (V ** torch.arange(L - 1, -1, -1))).sum(-1)
    return torch.bincount(idx, minlength=V**L).double() / len(tokens)


def chi2_ok(freq: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[bool, float]:
    """χ² over cells with expected count >= 5 (the rest pooled), at the 0.001 level (Wilson–Hilferty)."""
    exp, obs = probs * n, freq * n
    big = exp >= 5
    e = torch.cat([exp[big], exp[~big].sum()[None]]) if (~big).any() else exp[big]
    o = torch.cat([obs[big], obs[~big].sum()[None]]) if (~big).any() else obs[big]
    stat = ((o - e) ** 2 / e).sum().item()
    k = len(e) - 1
    crit = k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit, stat
