"""Energy-based parallel decoding (EDLM; Xu et al., 2025): importance sampling that repairs the
independence error of decoding several tokens in one step.

A step that decodes a set ``S`` of masked positions draws their tokens from the factorised
proposal ``∏_l p(x^l | z)``, which ignores how the tokens depend on each other. EDLM draws k
candidates ``x^(j)`` filling every masked position of the open block from that proposal, weights
each by ``exp(E(x^(j))) / ∏_l p(x^(j)_l | z)`` with ``E`` the log-likelihood of an energy model, and
keeps one candidate (∝ its weight) for the positions the decoder decodes now. With ``S`` = every
position, ``E = log p_joint`` and k → ∞ a step samples the joint exactly (self-normalised
importance resampling).

Energies: a causal LM (:class:`CausalEnergy`: any dlm AR checkpoint or converted AR model, scoring
the prompt-conditioned log-likelihood of the generation up to its first still-masked position), or a
callable ``energy(tokens_NG) -> Tensor[N]`` over the generation (mask id where not yet decoded).
``steps = n`` applies it in the first n steps of each block only (the paper's early, most parallel
steps); the model call of a step is shared by its candidates (no extra NFE), the energy costs k
evaluations per row and step.

Departures: which positions a step decodes is the decoder's own choice, made before the candidates
are drawn — exact for ``ancestral`` and ``first_hitting`` (the choice does not depend on the
tokens); for ``confidence`` rules it uses the decoder's own draw's confidences. Decode-time
log-probs are those of the factorised proposal of the kept tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.decode.blocks import BlockState, Decoding
from dlm.decode.guides import GUIDES
from dlm.decode.guides.base import GuidedOutput, GuideError, Values, as_reward, checked, draw, finish
from dlm.decode.output import resolve_mask_token_id
from dlm.decode.sampling import sample_categorical
from dlm.model.modeling import is_shifted, logits_of, next_token_logits


class Energy:
    """An energy over canvases: ``energy(canvas_NT, pad_NT | None, prompt_length) -> Tensor[N]``
    float64 log-likelihoods (higher = more likely)."""

    def __call__(self, canvas_NT: Tensor, pad_NT: Tensor | None, prompt_length: int) -> Tensor:
        raise NotImplementedError


class TokenEnergy(Energy):
    """A user callable ``fn(tokens_NG) -> Tensor[N]`` over the generation."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn

    def __call__(self, canvas_NT, pad_NT, prompt_length):
        gen = canvas_NT[:, prompt_length:]
        return checked("energy", self.fn(gen), gen.shape[0], gen.device)


class CausalEnergy(Energy):
    """Log-likelihood of the generation, up to its first masked position, under a causal LM
    (conditioned on the prompt). ``mask_id``: the decoding model's mask token (never scored)."""

    def __init__(self, model: nn.Module, mask_id: int, batch_size: int = 64):
        self.model, self.mask_id, self.batch_size = model, mask_id, batch_size
        self.dlm = bool(getattr(model, "supports_kv_cache", False))

    @torch.no_grad()
    def __call__(self, canvas_NT, pad_NT, prompt_length):
        out = []
        for start in range(0, canvas_NT.shape[0], self.batch_size):
            x = canvas_NT[start : start + self.batch_size]
            # masked positions lie after the scored prefix, so a causal model never reads them: any id will do
            x = x.masked_fill(x == self.mask_id, 0)
            pad = None if pad_NT is None else pad_NT[start : start + self.batch_size]
            kwargs = {"attn_mode": "causal"} if self.dlm else {}
            if pad is not None:
                kwargs["attention_mask"] = pad
                if not self.dlm:  # left padding: positions from each row's first real token
                    kwargs["position_ids"] = (pad.long().cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=x, **kwargs)
            logits = logits_of(logits).float()
            logp = torch.log_softmax(next_token_logits(logits, is_shifted(self.model)), dim=-1)
            logp = logp.gather(-1, x[:, 1:, None]).squeeze(-1).double()  # [n, T-1]: token t given its prefix
            decoded = (canvas_NT[start : start + self.batch_size, prompt_length:] != self.mask_id).long().cumprod(dim=1)
            decoded = decoded.bool()  # generation positions before the first mask
            out.append((logp[:, prompt_length - 1 :] * decoded).sum(dim=1))
        return torch.cat(out)


def check_same_vocabulary(tokenizer, energy_tokenizer, where: str) -> None:
    """EDLM scores the decoder's token ids with the energy model: every token of the decoding
    tokenizer (its mask token aside) must have the same id in the energy model's tokenizer."""
    mine, theirs = tokenizer.get_vocab(), energy_tokenizer.get_vocab()
    for token, i in sorted(mine.items(), key=lambda kv: kv[1]):
        if token != tokenizer.mask_token and theirs.get(token) != i:
            got = "is missing" if token not in theirs else f"has id {theirs[token]}"
            raise GuideError(
                f"the energy model at {where} has another tokenizer: token {token!r} is id {i} for the decoding "
                f"model but {got} there. EDLM scores token ids, so use an energy model trained with the same "
                "tokenizer (e.g. the AR baseline of the same recipe)"
            )


def as_energy(energy, mask_id: int) -> Energy:
    if isinstance(energy, Energy):
        return energy
    if isinstance(energy, nn.Module):
        return CausalEnergy(energy, mask_id)
    if callable(energy):
        return TokenEnergy(energy)
    raise GuideError(f"energy must be a causal LM, an Energy or a callable tokens_NG -> Tensor[N]; got {type(energy)}")


class EnergyPolicy:
    """Any in-block policy with its parallel steps' tokens resampled under an energy."""

    def __init__(self, inner, energy: Energy, decoder, candidates: int, steps: int | None):
        self.inner, self.energy, self.decoder, self.k, self.steps = inner, energy, decoder, candidates, steps
        self.pad: Tensor | None = None
        self.prompt_length = 0
        self.nfe: Tensor | None = None  # [B] energy evaluations per row
        self.calls = 0

    def bind(self, dec: Decoding) -> None:
        self.pad, self.prompt_length = dec.logits.pad, dec.prompt_length
        self.nfe = torch.zeros(dec.x.shape[0], dtype=torch.long)

    def start_block(self, masked, steps, generator):
        return self.inner.start_block(masked, steps, generator)

    def reindex(self, index):
        if hasattr(self.inner, "reindex"):
            self.inner.reindex(index)

    def step(self, state: BlockState, generator) -> tuple[Tensor, Tensor, Tensor]:
        decode, tokens, logprobs = self.inner.step(state, generator)
        decode = decode & state.masked
        rows = decode.any(dim=1)
        if (self.steps is not None and state.step >= self.steps) or self.k < 2 or not bool(rows.any()):
            return decode, tokens, logprobs
        masked = state.masked & rows[:, None]
        cand_logits = state.logits(masked)  # [N, V]: the step's own (cached) model call
        cfg, k, N = self.decoder, self.k, cand_logits.shape[0]
        # k draws from the one set of logits (not a k-fold copy of them: memory stays one [N, V] at a time)
        draws = [sample_categorical(cand_logits, cfg.temperature, generator, cfg.top_k, cfg.top_p) for _ in range(k)]
        drawn, logq = torch.stack([d for d, _ in draws]), torch.stack([q for _, q in draws])  # [k, N]
        sel = rows.nonzero().squeeze(1)  # [R] rows that decode now
        R, T = sel.shape[0], state.x.shape[1]
        slot = torch.cumsum(rows.long(), 0)[masked.nonzero()[:, 0]] - 1  # [N] candidate -> its row among sel
        logq_kR = torch.zeros(k, R, dtype=torch.float64, device=logq.device).index_add_(1, slot, logq)
        canvases = state.x[sel].repeat(k, 1).view(k, R, T)
        canvases[:, :, state.start : state.start + masked.shape[1]][:, masked[sel]] = drawn.to(canvases.dtype)
        pad = None if self.pad is None else self.pad[sel].repeat(k, 1)
        energy = self.energy(canvases.view(k * R, T), pad, self.prompt_length).view(k, R).to(logq_kR.device)
        self.calls += -(-k * R // getattr(self.energy, "batch_size", k * R))
        self.nfe.index_add_(0, sel.cpu(), torch.full((R,), k, dtype=torch.long))
        kept = draw((energy - logq_kR).T, generator).to(drawn.device)  # [R]
        pick = kept[slot]
        tokens, logprobs = tokens.clone(), logprobs.clone()
        tokens[masked] = drawn[pick, torch.arange(N, device=drawn.device)]
        logprobs[masked] = logq[pick, torch.arange(N, device=logq.device)]
        return decode, tokens, logprobs


@GUIDES.register("edlm")
@dataclass(frozen=True)
class EDLM:
    candidates: int = 8
    """Candidates per parallel step (k); 1 = the decoder alone."""
    steps: int | None = None
    """Resample in the first n steps of each block only (None: every step)."""

    def __post_init__(self):
        if self.candidates < 1:
            raise ValueError(f"candidates={self.candidates} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1 (or None: every step)")

    def __call__(
        self, decoder, model, prompt_ids, *, energy, reward=None, value=None, attention_mask=None, generator=None
    ) -> GuidedOutput:
        """``energy``: a causal LM, an :class:`Energy` or a callable; ``reward`` (optional) scores the samples."""
        if decoder.temperature == 0:
            raise ValueError("EDLM resamples from the decoder's proposal: use temperature > 0 (0 is greedy)")
        B = prompt_ids.shape[0]
        mask_id = resolve_mask_token_id(model, decoder.mask_token_id)
        policy = EnergyPolicy(decoder.make_policy(), as_energy(energy, mask_id), decoder, self.candidates, self.steps)
        dec = Decoding(decoder, policy, model, prompt_ids, attention_mask, generator)
        policy.bind(dec)
        while dec.advance():
            pass
        scorer = as_reward(reward) if reward is not None else _NoReward()
        values = Values(model, scorer, None, B, 1)
        log_w = torch.zeros(B, 1, dtype=torch.float64, device=dec.x.device)
        return finish(
            dec, values, 1, log_w, torch.zeros(B, dtype=torch.long), extra_calls=policy.calls, energy_nfe=policy.nfe
        )


class _NoReward:
    name = "no reward"

    def __call__(self, gen_NG, prompt_of_N):
        return torch.full((gen_NG.shape[0],), float("nan"), dtype=torch.float64, device=gen_NG.device)
