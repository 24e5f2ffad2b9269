"""What every guide shares: the output, rewards and values over token tensors, and weights in log space.

A guide runs the decoder's own block loop (:class:`dlm.decode.blocks.Decoding`) over
``prompts × particles`` rows and only acts between its steps. Rewards, values and energies are
evaluated on the *generation* ``[N, G]`` of rows:

* a reward ``r`` scores a finished generation (its text view: EOS after the first EOS);
* a value ``v(z)`` estimates the soft value ``α·log E_{x ~ p(·|z)} exp(r(x)/α)`` of a partial
  canvas; the default is ``r(x̂₀(z))`` with ``x̂₀`` the denoiser's greedy completion of ``z`` (one
  full model call per row, counted as NFE). A complete canvas is valued by its reward exactly.

Weights are kept as log-weights throughout (rewards of ±1e4 stay finite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlm.decode.blocks import Decoding
from dlm.decode.output import model_logits
from dlm.decode.sampling import uniforms
from dlm.decode.stopping import until_eos


class GuideError(ValueError):
    """A reward, value or energy is unusable (wrong shape, non-finite values); the message names it."""


@dataclass
class GuidedOutput:
    """One sample per prompt, and the particles it was chosen from."""

    tokens: Tensor
    """[B, P + G] the sample of each prompt (text view: EOS after a finished row's first EOS)."""
    reward: Tensor
    """[B] float64 reward of the sample (NaN when the guide ran without a reward)."""
    particles: Tensor
    """[B, K, P + G] every final particle (text view)."""
    particle_rewards: Tensor
    """[B, K] float64 their rewards."""
    log_weights: Tensor
    """[B, K] float64 normalised log-weights of the particles (log 1/K where they are equally weighted)."""
    nfe: Tensor
    """[B] model evaluations spent on each prompt, every particle's counted: decoding + values + energy."""
    decode_nfe: Tensor
    """[B] of which the decoder's own steps."""
    value_nfe: Tensor
    """[B] of which value estimates (greedy completions of partial canvases)."""
    energy_nfe: Tensor
    """[B] of which energy-model evaluations (EDLM)."""
    model_calls: int
    """Batched forward passes run (decoder, value and energy models)."""
    prompt_length: int
    resamples: int = 0
    """SMC: resampling events over all prompts."""

    @property
    def generated(self) -> Tensor:
        return self.tokens[:, self.prompt_length :]


def expand(prompt_ids: Tensor, attention_mask: Tensor | None, n: int) -> tuple[Tensor, Tensor | None]:
    """Each prompt row repeated ``n`` times (row ``b·n + k`` is particle ``k`` of prompt ``b``)."""
    ids = prompt_ids.repeat_interleave(n, dim=0)
    return ids, None if attention_mask is None else attention_mask.repeat_interleave(n, dim=0)


def final_text(gen_NG: Tensor, eos: int | None, mask_id: int, finished_N: Tensor | None = None) -> Tensor:
    """What a complete generation reads as text: after the first EOS (and, in finished rows, at
    never-decoded positions) everything is EOS."""
    if eos is None:
        return gen_NG
    out = gen_NG.clone()
    is_eos = out == eos
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    fill = after if finished_N is None else after | (finished_N[:, None] & (out == mask_id))
    out[fill] = eos
    return out


# --- rewards ------------------------------------------------------------------------------------


def checked(name: str, values, n: int, device: torch.device) -> Tensor:
    """``values`` as a float64 tensor ``[n]`` of finite numbers, or a GuideError naming ``name``."""
    try:
        out = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise GuideError(f"{name} must return a tensor of {n} numbers; got {type(values).__name__}: {exc}") from None
    if out.shape != (n,):
        raise GuideError(f"{name} must return one number per row, shape [{n}]; got shape {list(out.shape)}")
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise GuideError(f"{name} returned {bad} non-finite value(s) of {n}; rewards and values must be finite")
    return out.to(device)


class Reward:
    """A reward over generations: ``reward(gen_NG, prompt_of_N) -> Tensor[N]`` float64."""

    name = "reward"

    def __call__(self, gen_NG: Tensor, prompt_of_N: Tensor) -> Tensor:
        raise NotImplementedError


class TokenReward(Reward):
    """A user's token-level callable ``fn(tokens_NG) -> Tensor[N]``."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn, self.name = fn, f"reward {getattr(fn, '__name__', type(fn).__name__)!r}"

    def __call__(self, gen_NG, prompt_of_N):
        return checked(self.name, self.fn(gen_NG), gen_NG.shape[0], gen_NG.device)


class TextReward(Reward):
    """A text reward of ``dlm.train.rl.rewards`` (by name): completions are decoded up to the first
    EOS and scored with their prompt's text and fields (e.g. a task's reference ``response``)."""

    def __init__(self, name: str, tokenizer, prompts: Sequence[str], fields: dict[str, list] | None = None):
        from dlm.train.rl.rewards import resolve

        resolve(name)  # unknown names fail here, listing the known rewards
        self.reward_name, self.tokenizer, self.prompts, self.fields = name, tokenizer, list(prompts), fields or {}
        self.name = f"reward {name!r}"

    def __call__(self, gen_NG, prompt_of_N):
        from dlm.train.rl.rewards import RewardError, score

        eos = self.tokenizer.eos_token_id
        texts = []
        for row in gen_NG.tolist():
            texts.append(self.tokenizer.decode(until_eos(row, eos), skip_special_tokens=True))
        rows = prompt_of_N.tolist()
        fields = {k: [v[i] for i in rows] for k, v in self.fields.items()}
        try:
            values = score(self.reward_name, [self.prompts[i] for i in rows], texts, **fields)
        except RewardError as exc:
            raise GuideError(str(exc)) from None
        return checked(self.name, values, len(texts), gen_NG.device)


def as_reward(reward, tokenizer=None, prompts: Sequence[str] | None = None, fields=None) -> Reward:
    """A :class:`Reward` from a registry name (needs ``tokenizer`` and the prompts' texts) or a callable."""
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        if tokenizer is None or prompts is None:
            raise GuideError(
                f"reward {reward!r} scores text: build it with as_reward({reward!r}, tokenizer, prompts[, fields])"
            )
        return TextReward(reward, tokenizer, prompts, fields)
    if callable(reward):
        return TokenReward(reward)
    raise GuideError(f"reward must be a reward name or a callable tokens_NG -> Tensor[N]; got {type(reward).__name__}")


# --- values -------------------------------------------------------------------------------------


class Values:
    """Values of rows of a :class:`Decoding`, with NFE counted per prompt.

    A complete canvas (no mask left in the generation, or a finished row) is valued by its reward;
    a partial one by ``value(canvas_NG, mask_id)`` when given, else by the reward of the model's
    greedy completion ``x̂₀`` of the canvas (one full forward per row).
    """

    def __init__(
        self,
        model: nn.Module,
        reward: Reward,
        value: Callable[[Tensor, int], Tensor] | None,
        prompts: int,
        per_prompt: int,
        batch_size: int = 64,
    ):
        self.model, self.reward, self.value = model, reward, value
        self.per_prompt, self.batch_size = per_prompt, batch_size
        self.nfe = torch.zeros(prompts, dtype=torch.long)
        self.calls = 0

    def prompt_of(self, rows: Tensor) -> Tensor:
        return rows // self.per_prompt

    def rewards(self, dec: Decoding, rows: Tensor) -> Tensor:
        """``[len(rows)]`` rewards of the (complete) rows' text."""
        gen = final_text(dec.x[rows, dec.prompt_length :], dec.eos, dec.mask_id, dec.finished[rows])
        return self.reward(gen, self.prompt_of(rows.cpu()))

    @torch.no_grad()
    def __call__(self, dec: Decoding, rows: Tensor) -> Tensor:
        """``[len(rows)]`` float64 values of the canvases of ``rows`` (indices into the batch)."""
        P = dec.prompt_length
        out = torch.empty(len(rows), dtype=torch.float64, device=dec.x.device)
        if len(rows) == 0:
            return out
        gen = dec.x[rows, P:]
        complete = ~(gen == dec.mask_id).any(dim=1) | dec.finished[rows]
        if complete.any():
            out[complete] = self.rewards(dec, rows[complete])
        partial = rows[~complete]
        if len(partial):
            out[~complete] = self._partial(dec, partial)
        return out

    def _partial(self, dec: Decoding, rows: Tensor) -> Tensor:
        P, mask_id = dec.prompt_length, dec.mask_id
        if self.value is not None:
            canvas = dec.x[rows, P:]
            return checked("value", self.value(canvas, mask_id), len(rows), canvas.device)
        completed = []
        pad = dec.logits.pad
        for chunk in rows.split(self.batch_size):
            x = dec.x[chunk]
            logits = model_logits(self.model, x, None if pad is None else pad[chunk]).float()
            logits[..., mask_id] = float("-inf")  # SUBS: never the mask token
            greedy = torch.where(x == mask_id, logits.argmax(dim=-1), x)
            completed.append(greedy[:, P:])
            self.calls += 1
            self.nfe.index_add_(0, self.prompt_of(chunk.cpu()), torch.ones(len(chunk), dtype=torch.long))
        gen = final_text(torch.cat(completed), dec.eos, mask_id)
        return self.reward(gen, self.prompt_of(rows.cpu()))


def finish(
    dec: Decoding,
    values: Values,
    per_prompt: int,
    log_w: Tensor,
    chosen: Tensor,
    extra_calls: int = 0,
    energy_nfe: Tensor | None = None,
    resamples: int = 0,
    stride: int = 1,
    rewards: Tensor | None = None,
) -> GuidedOutput:
    """The :class:`GuidedOutput` of a finished decode of ``B × per_prompt`` rows: particle ``k`` of
    prompt ``b`` is row ``(b·per_prompt + k)·stride`` (``stride``: rows per particle, e.g. SVDD's
    candidates), ``chosen[b]`` the particle returned; ``rewards`` ``[B, per_prompt]`` when known."""
    out = dec.output()  # alignment columns of block-causal models stripped
    rows = torch.arange(0, out.tokens.shape[0], stride, device=out.tokens.device)
    B = log_w.shape[0]
    if rewards is None:
        rewards = values.rewards(dec, rows).view(B, per_prompt)
    text = out.tokens[rows].view(B, per_prompt, -1)
    pick = torch.arange(B)
    decode_nfe = dec.logits.nfe.view(B, -1).sum(dim=1).cpu()
    energy = torch.zeros(B, dtype=torch.long) if energy_nfe is None else energy_nfe
    return GuidedOutput(
        text[pick, chosen],
        rewards[pick, chosen],
        text,
        rewards,
        normalise(log_w),
        decode_nfe + values.nfe + energy,
        decode_nfe,
        values.nfe.clone(),
        energy,
        dec.logits.calls + values.calls + extra_calls,
        out.prompt_length,
        resamples,
    )


# --- weights in log space -----------------------------------------------------------------------


def normalise(log_w: Tensor) -> Tensor:
    """Rows of log-weights ``[B, K]`` normalised (``logsumexp`` 0 per row)."""
    return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """``(Σw)² / Σw²`` per row of log-weights ``[B, K]``."""
    return torch.exp(2 * torch.logsumexp(log_w, dim=-1) - torch.logsumexp(2 * log_w, dim=-1))


def draw(log_w: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of log-weights ``[B, K]`` with probability ∝ ``exp(log_w)`` (float64
    inverse CDF on uniforms from ``generator``)."""
    p = torch.softmax(log_w.double(), dim=-1)
    u = uniforms(p.shape[0], generator, p.device)[:, None]
    cdf = p.cumsum(dim=-1)
    idx = (cdf <= u * cdf[:, -1:]).sum(dim=-1)
    return idx.clamp(max=p.shape[1] - 1)


def resample(log_w: Tensor, generator: torch.Generator | None, kind: str) -> Tensor:
    """``[B, K]`` ancestor indices per row: ``systematic`` (one uniform per row, K evenly spaced
    points) or ``multinomial`` (K independent draws)."""
    B, K = log_w.shape
    p = torch.softmax(log_w.double(), dim=-1)
    cdf = p.cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:]
    if kind == "systematic":
        u = (uniforms(B, generator, p.device)[:, None] + torch.arange(K, dtype=torch.float64, device=p.device)) / K
    else:
        u = uniforms(B * K, generator, p.device).view(B, K)
    return torch.searchsorted(cdf, u, right=True).clamp(max=K - 1)


def soft_max(values: Tensor, log_counts: Tensor, alpha: float) -> float:
    """``α · log Σ (n_c / Σn) exp(v_c / α)`` (α > 0), the maximum when α = 0."""
    if alpha == 0:
        return float(values.max())
    total = torch.logsumexp(log_counts + values / alpha, dim=0) - torch.logsumexp(log_counts, dim=0)
    return float(alpha * total)


def check_alpha(alpha: float, allow_zero: bool, what: str) -> None:
    if not (alpha > 0 or (allow_zero and alpha == 0)) or math.isnan(alpha):
        bound = ">= 0 (0 = the reward's maximiser)" if allow_zero else "> 0"
        raise ValueError(f"alpha={alpha} must be {bound}: {what}")
