"""The semi-autoregressive block loop every decoder runs on (docs/decoders.md#the-semi-autoregressive-block-loop).

The generation is split into blocks of ``block_length`` decoded left to right; ``steps`` are
spread evenly over them; positions beyond the current block are never eligible. Inside a
block an *in-block policy* (ancestral, first-hitting, confidence) decides at each step which
masked positions to decode and draws their tokens. One block of ``gen_length`` is plain
(non-semi-AR) decoding.

``Logits`` serves the policies: it calls the model lazily, only when a row that needs logits
changed since the last call (the no-change cache: exact for models without a time input),
counts each row's evaluations honestly, applies SUBS (the mask token gets probability 0) and
classifier-free guidance (the unconditional branch masks the prompt; LLaDA's
``l_u + (s + 1)(l_c − l_u)``).

After each block, rows that produced EOS (or meet the ``stop`` criterion) are finished and
receive no further computation. The decoding history stays as it happened: ``DecodeOutput.canvas``,
``step_map`` and ``logprobs`` keep every decoded token (those after the first EOS too) and leave
never-decoded positions masked; only the text view ``DecodeOutput.tokens`` is filled with EOS after
a finished row's first EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from dlm.decode.caches import CACHES, Runner, check_cache, make_runner
from dlm.decode.compiled import backend_of, check_backend, compiled_forward
from dlm.decode.output import DecodeOutput, check_context, left_pad_mask, resolve_mask_token_id
from dlm.decode.sampling import Scratch, sample_categorical
from dlm.model.modeling import supports_output_mask
from dlm.schedules import build_schedule


@dataclass(frozen=True)
class DecodeConfig:
    gen_length: int = 128
    """Tokens to generate."""
    steps: int = 128
    """Denoising steps over the whole generation (split evenly over blocks)."""
    block_length: int | None = None
    """Semi-autoregressive block length; None = one block of gen_length."""
    mask_token_id: int | None = None
    """None: taken from the model config."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 0.0
    """Classifier-free guidance scale (0 = off); doubles the model calls' batch."""
    eos_token_id: int | None = None
    """None: taken from the model config when present."""
    stop_at_eos: bool = True
    """Finish a row at the end of the block in which it produced EOS."""
    stop: Callable[[Tensor], Tensor] | None = None
    """Optional criterion ``generated [B, G'] -> finished [B]`` checked after each block (stop strings)."""
    record_history: bool = False
    """Keep the canvas after every step (``DecodeOutput.history``), for replay."""
    cache: str = "none"
    """KV cache (``decode/caches.py``): ``none``; ``exact`` for block-causal (BD3-LM) models
    (output equals no cache); ``prefix``, ``dual`` (Fast-dLLM, refreshed at block starts) or
    ``delayed`` (dKV-Cache-Decode) for bidirectional or block-causal models."""
    refresh_every: int = 8
    """Delayed cache: a full forward at each block start and every ``r`` model calls (1 = no cache)."""
    open_next_at: float = 1.0
    """Pipelined blocks (D2F / dInfer): the next block opens — its positions become eligible, attending
    to the open blocks' partial state — once every unfinished row has decoded this fraction of the
    newest open block. 1.0 = block by block (no pipelining)."""
    max_open_blocks: int = 2
    """Pipelined blocks: at most this many blocks open at once."""
    compile: bool | str = False
    """Run the model's forward under ``torch.compile`` over bucketed shapes (``decode/compiled.py``):
    ``True`` = inductor (CUDA graphs on GPU), or a ``torch.compile`` backend name (``aot_eager``, …).
    The same tokens as uncompiled decoding, up to floating-point reassociation."""

    def __post_init__(self):
        if self.gen_length < 1:
            raise ValueError(f"gen_length={self.gen_length} must be >= 1")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        block = self.block_length or self.gen_length
        if block < 1 or self.gen_length % block:
            raise ValueError(
                f"block_length={self.block_length} does not divide gen_length={self.gen_length}; "
                f"choose a divisor (e.g. {largest_divisor(self.gen_length, block)}) or raise gen_length to a multiple"
            )
        if self.steps < self.gen_length // block:
            raise ValueError(
                f"steps={self.steps} is fewer than the {self.gen_length // block} blocks; "
                "use at least one step per block"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be >= 0")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r}; choose one of {', '.join(CACHES)}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every={self.refresh_every} must be >= 1 (1 = refresh at every call)")
        if not 0.0 <= self.open_next_at <= 1.0:
            raise ValueError(f"open_next_at={self.open_next_at} must lie in [0, 1] (1 = no pipelining)")
        if self.max_open_blocks < 1:
            raise ValueError(f"max_open_blocks={self.max_open_blocks} must be >= 1 (1 = no pipelining)")
        if isinstance(self.compile, str):
            check_backend(self.compile)
        if self.pipelined and not self.can_pipeline():
            raise ValueError(
                f"open_next_at={self.open_next_at} pipelines blocks, which needs an in-block policy that decodes "
                "by confidence without a per-block step schedule: use the confidence decoder with rule=threshold "
                "or rule=factor (or open_next_at=1)"
            )

    @property
    def pipelined(self) -> bool:
        """Whether blocks are pipelined (a block may open before the previous one is decoded)."""
        return self.open_next_at < 1.0 and self.max_open_blocks > 1

    def can_pipeline(self) -> bool:
        """Whether this decoder's policy can decode a window of several open blocks."""
        return False

    def make_policy(self) -> InBlockPolicy:
        """The in-block policy of this decoder (each decoder defines it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define make_policy()")

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DecodeOutput:
        return run_blocks(self, self.make_policy(), model, prompt_ids, attention_mask, generator)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    def block_steps(self, block: int) -> int:
        """Steps of block ``block``: ``steps // num_blocks``, the first ``steps % num_blocks`` blocks one more."""
        base, extra = divmod(self.steps, self.num_blocks)
        return base + (block < extra)


def schedule_of(name: str, eps: float):
    """A decoder's noise schedule (polynomial has no eps)."""
    return build_schedule(name) if name == "polynomial" else build_schedule(name, eps=eps)


def sample_at(state: BlockState, decode: Tensor, cfg: DecodeConfig, generator) -> tuple[Tensor, Tensor]:
    """Tokens and float64 log-probs ``[B, Tb]`` drawn at the ``decode`` positions (zeros elsewhere)."""
    tokens = torch.zeros_like(decode, dtype=torch.long)
    logprobs = torch.zeros(decode.shape, dtype=torch.float64, device=decode.device)
    if decode.any():  # a step that decodes nothing calls no model (the no-change cache)
        tokens[decode], logprobs[decode] = sample_categorical(
            state.logits(decode), cfg.temperature, generator, cfg.top_k, cfg.top_p
        )
    return tokens, logprobs


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


class Logits:
    """Lazy, cached model evaluation of one block's candidate logits, with per-row NFE accounting.

    A model call scores the block's *eligible* positions (its masked positions in unfinished
    rows) and keeps them as ``value`` ``[N, V]`` (float32, SUBS applied), one row per eligible
    position in row-major order — never a zero-filled ``[B, Tb, V]``. A policy asks for the rows
    of the positions it needs (``want ⊆ eligible``); asking for all eligible positions returns
    ``value`` itself, a subset is gathered. The model is called again only when a wanted row
    changed since the last call (the no-change cache: exact for models without a time input).
    Models that declare ``supports_output_mask`` (dlm's own) compute the LM head only at those
    positions; others return the whole canvas and the rows are taken from it. The runner
    (``decode/caches.py``) decides which columns each call feeds. With ``shared = M > 1`` rows
    come in groups of M identical canvases: the model runs on the first row of each group.
    """

    def __init__(
        self,
        pad: Tensor | None,
        mask_id: int,
        cfg: DecodeConfig,
        prompt_length: int,
        runner: Runner,
        shared: int = 1,
    ):
        self.pad, self.mask_id, self.cfg, self.prompt_length = pad, mask_id, cfg, prompt_length
        self.runner = runner  # which columns each model call feeds (the KV-cache policy)
        self.shared = shared
        self.value: Tensor | None = None  # [N, V] float32 with SUBS applied, rows of `where`
        self.where: Tensor | None = None  # [B, Tb] the positions value holds
        self.row_of: Tensor | None = None  # [B, Tb] the row of value for each position of `where`
        self.span: tuple[int, int] | None = None  # the block the cached value belongs to
        self.stale: Tensor | None = None  # [B] row changed since the last model call
        self.unseen: Tensor | None = None  # [B] row changed since it last used logits
        self.nfe: Tensor | None = None
        self.calls = 0

    def reset(self, batch: int, device: torch.device) -> None:
        self.stale = torch.ones(batch, dtype=torch.bool, device=device)
        self.unseen = self.stale.clone()
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)
        self.leader = torch.arange(batch, device=device) % self.shared == 0  # rows whose evaluation counts

    def __call__(self, x: Tensor, start: int, end: int, eligible: Tensor, want: Tensor) -> Tensor:
        """Logits ``[n, V]`` of the ``want`` positions (``[B, end - start]``, a subset of ``eligible``)
        of canvas ``x`` in block ``[start, end)``, in row-major order."""
        if self.value is None or self.span != (start, end) or bool(((self.stale[:, None] | ~self.where) & want).any()):
            self._forward(x, start, end, eligible)
            self.span = (start, end)
            self.stale.zero_()
            self.calls += 1
        rows = want.any(dim=1)
        self.nfe += (rows & self.unseen & self.leader).long()
        self.unseen &= ~rows
        if want is self.where and self.shared == 1:
            return self.value
        return self.value[self.row_of[want]]

    def changed(self, rows: Tensor) -> None:
        self.stale |= rows
        self.unseen |= rows

    def reindex(self, index: Tensor) -> None:
        """Rows follow ``index`` (see :meth:`Decoding.reindex`); the runner's rows too."""
        B = self.stale.shape[0]
        index = index.to(self.stale.device)
        if self.value is not None:  # a copied row reads the copied row's logits
            self.where, self.row_of = self.where[index], self.row_of[index]
        self.stale, self.unseen = self.stale[index], self.unseen[index]
        if self.pad is not None:
            self.pad = self.pad[index]
        if self.shared > 1:
            groups = torch.arange(B, device=index.device) // self.shared
            if not bool((index // self.shared == groups).all()):
                raise ValueError(f"with shared={self.shared}, rows may only be reindexed within their group")
            return  # the runner holds one row per group, which keeps its slot
        self.runner.reindex(torch.cat([index, index + B]) if self.cfg.cfg_scale > 0 else index)

    def _run(self, x: Tensor, pad: Tensor | None, start: int, end: int, wanted: Tensor) -> Tensor:
        return self.runner(x, pad, start, end, new_block=self.span != (start, end), wanted=wanted)

    def _forward(self, x: Tensor, start: int, end: int, eligible: Tensor) -> None:
        pad, wanted = self.pad, eligible
        if self.shared > 1:
            groups = x.view(-1, self.shared, x.shape[1])
            if not bool((groups == groups[:, :1]).all()):
                raise RuntimeError(f"rows of a shared group (shared={self.shared}) differ at a model call")
            x, pad, wanted = x[:: self.shared], None if pad is None else pad[:: self.shared], eligible[:: self.shared]
        if self.cfg.cfg_scale > 0:
            uncond = x.clone()
            prompt = torch.zeros_like(x, dtype=torch.bool)
            prompt[:, : self.prompt_length] = True
            if pad is not None:
                prompt &= pad.bool()
            uncond[prompt] = self.mask_id
            both = None if pad is None else torch.cat([pad, pad])
            cond, un = self._run(torch.cat([x, uncond]), both, start, end, torch.cat([wanted, wanted])).float().chunk(2)
            logits = un + (self.cfg.cfg_scale + 1) * (cond - un)
        else:
            logits = self._run(x, pad, start, end, wanted).float()
        logits[:, self.mask_id] = float("-inf")  # SUBS
        row_of = (wanted.flatten().cumsum(0) - 1).view(wanted.shape)
        self.value, self.where = logits, eligible
        self.row_of = row_of.repeat_interleave(self.shared, dim=0) if self.shared > 1 else row_of


@dataclass
class BlockState:
    """What an in-block policy sees at one step; positions are block-relative ``[B, Tb]``."""

    x: Tensor  # [B, T] canvas (read-only for policies)
    start: int  # first canvas column of the block
    masked: Tensor  # [B, Tb] eligible masked positions
    step: int  # step index within the block
    steps: int  # step budget of the block
    logits: Callable[[Tensor], Tensor]  # positions want [B, Tb] (⊆ masked) -> their logits [n, V], row-major


class InBlockPolicy(Protocol):
    def start_block(self, masked: Tensor, steps: int, generator: torch.Generator | None) -> int:
        """Prepare for a block; return the maximum number of steps to run in it."""
        ...

    def step(self, state: BlockState, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(decode [B, Tb] bool, tokens [B, Tb], logprobs [B, Tb] float64)``."""
        ...


def run_blocks(
    cfg: DecodeConfig,
    policy: InBlockPolicy,
    model: nn.Module,
    prompt_ids: Tensor,
    attention_mask: Tensor | None,
    generator: torch.Generator | None,
) -> DecodeOutput:
    decoding = Decoding(cfg, policy, model, prompt_ids, attention_mask, generator)
    while decoding.advance():
        pass
    return decoding.output()


def block_causal_size(model: nn.Module) -> int | None:
    """The block size of a block-causal model, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "attention_mode", None) == "block_causal":
        return int(config.block_size)
    return None


class Decoding:
    """One batched decode as a state machine over the semi-AR block loop.

    ``advance()`` runs one decoding step of every unfinished row (opening the next block and
    finishing rows at block ends as needed) and returns False once decoding is over; ``output()``
    is the :class:`DecodeOutput`. :func:`run_blocks` is ``while advance(): pass``. Guided decoding
    (``dlm.decode.guides``) drives the same loop step by step: between steps it may reorder or
    duplicate rows (``reindex``: resampling particles, with every per-row state — canvas, logits,
    KV cache, policy — following its row), restrict a step to some rows (``advance(active)``) and
    set rows to a stored state (``load``).

    ``shared = M > 1`` declares that rows come in consecutive groups of M whose canvases are
    identical at every model call (SVDD's M candidate transitions of one particle): the model runs
    on one row per group and its logits serve the group; NFE counts one evaluation per group.
    """

    def __init__(
        self,
        cfg: DecodeConfig,
        policy: InBlockPolicy,
        model: nn.Module,
        prompt_ids: Tensor,
        attention_mask: Tensor | None,
        generator: torch.Generator | None,
        *,
        shared: int = 1,
    ):
        mask_id = resolve_mask_token_id(model, cfg.mask_token_id)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and not 0 <= mask_id < vocab:
            raise ValueError(
                f"mask_token_id={mask_id} is outside the model's vocabulary of {vocab}; "
                "use the mask token of the model's tokenizer"
            )
        check_context(model, prompt_ids.shape[1] + cfg.gen_length)  # alignment padding below takes no positions
        check_cache(model, cfg.cache)
        if shared < 1 or prompt_ids.shape[0] % shared:
            raise ValueError(f"shared={shared} must be >= 1 and divide the batch of {prompt_ids.shape[0]} rows")
        prompt_ids, attention_mask, self.extra = _align_to_model_blocks(cfg, model, prompt_ids, attention_mask, mask_id)
        self.cfg, self.policy, self.generator, self.mask_id, self.shared = cfg, policy, generator, mask_id, shared
        eos = cfg.eos_token_id
        if eos is None:
            found = getattr(getattr(model, "config", None), "eos_token_id", None)
            eos = found[0] if isinstance(found, (list, tuple)) else found
        self.eos = eos
        B, P = prompt_ids.shape
        G = cfg.gen_length
        device = prompt_ids.device
        self.prompt_length = P
        self.x = torch.cat([prompt_ids, torch.full((B, G), mask_id, dtype=prompt_ids.dtype, device=device)], dim=1)
        self.step_map = torch.full_like(self.x, -1)
        self.logprobs = torch.zeros(self.x.shape, dtype=torch.float64, device=device)
        # policies that simulate the continuous-time chain (first-hitting) expose last_times
        self.times = (
            torch.full(self.x.shape, float("nan"), dtype=torch.float64, device=device)
            if hasattr(policy, "last_times")
            else None
        )
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        pad = left_pad_mask(prompt_ids, attention_mask, G)
        rows = B // shared * (2 if cfg.cfg_scale > 0 else 1)
        block_only = supports_output_mask(model)
        call = compiled_forward(model, backend_of(cfg.compile)) if cfg.compile else None
        runner = make_runner(cfg.cache, model, rows, P + G, mask_id, cfg.refresh_every, block_only, call)
        self.logits = Logits(pad, mask_id, cfg, P, runner, shared)
        self.logits.reset(B, device)
        self.scratch = Scratch()  # the sampler's [N, V] buffer, reused step after step
        self.history: list[Tensor] = []
        self.block_len = G // cfg.num_blocks
        self.block = 0  # index of the oldest open (or next) block
        self.last = 0  # index of the newest open block (> block only when pipelining)
        self.block_steps: int | None = None  # step budget of the open block; None = not opened yet
        self.step_in_block = 0
        self.global_step = 0
        self.done = False

    @property
    def span(self) -> tuple[int, int]:
        """Canvas columns ``[start, end)`` of the open blocks (one block unless pipelining)."""
        start = self.prompt_length + self.block * self.block_len
        return start, self.prompt_length + (self.last + 1) * self.block_len

    def masked(self) -> Tensor:
        """``[B, W]`` masked positions of the open blocks in unfinished rows."""
        start, end = self.span
        return (self.x[:, start:end] == self.mask_id) & ~self.finished[:, None]

    def ready(self) -> bool:
        """Open and close blocks until a decoding step can run; False once every block is done or
        every row finished (nothing left to decode)."""
        while not self.done:
            if self.block_steps is None:
                self.last = max(self.last, self.block)
                budget = self.cfg.block_steps(self.block)
                self.block_steps = self.policy.start_block(self.masked(), budget, self.generator)
                if self.cfg.pipelined:  # >= 1 token per row and step: the open blocks end within their masks
                    self.block_steps = self.cfg.gen_length
                self.step_in_block = 0
            if self.cfg.pipelined:
                self._open_next()
                start = self.prompt_length + self.block * self.block_len
                oldest = self.x[:, start : start + self.block_len] == self.mask_id
                if not bool((oldest & ~self.finished[:, None]).any()):
                    self._close_block()  # the oldest open block is decoded; the newer ones stay open
                    continue
            if self.step_in_block < self.block_steps and self.masked().any():
                return True
            self._close_block()
        return False

    def _open_next(self) -> None:
        """Pipelining: open blocks after the newest while every unfinished row has decoded
        ``open_next_at`` of it, up to ``max_open_blocks`` open."""
        cfg = self.cfg
        while self.last + 1 < cfg.num_blocks and self.last - self.block + 1 < cfg.max_open_blocks:
            lo = self.prompt_length + self.last * self.block_len
            decoded = (self.x[:, lo : lo + self.block_len] != self.mask_id).double().mean(dim=1)
            if not bool((decoded[~self.finished] >= cfg.open_next_at).all()):
                return
            self.last += 1

    @torch.no_grad()  # decoding never backpropagates: a graph kept per step would hold every activation
    def advance(self, active: Tensor | None = None) -> bool:
        """Run one decoding step; ``active`` ``[B]`` restricts it to some rows (the others keep
        their canvas). Returns False, doing nothing, once decoding is over (see :meth:`ready`)."""
        if not self.ready():
            return False
        eligible = self.masked()
        self._step(eligible, eligible if active is None else eligible & active[:, None].to(eligible.device))
        return True

    def _step(self, eligible: Tensor, masked: Tensor) -> None:
        """One step over the ``masked`` positions (``eligible`` restricted to the active rows); a model
        call scores every ``eligible`` position, so rows that wait this step can reuse it."""
        start, end = self.span
        if masked is eligible or masked.any():  # ready() found eligible positions: no second device sync
            x = self.x
            state = BlockState(
                x, start, masked, self.step_in_block, self.block_steps, partial(self.logits, x, start, end, eligible)
            )
            with self.scratch.active():
                decode, tokens, lp = self.policy.step(state, self.generator)
            decode &= masked
            block = x[:, start:end]
            block[decode] = tokens[decode].to(x.dtype)
            self.step_map[:, start:end][decode] = self.global_step
            self.logprobs[:, start:end][decode] = lp[decode].double()
            if self.times is not None:
                self.times[:, start:end][decode] = self.policy.last_times[decode]
            self.logits.changed(decode.any(dim=1))
        self.global_step += 1
        self.step_in_block += 1
        if self.cfg.record_history:
            self.history.append(self.x.clone())

    def _close_block(self) -> None:
        end = self.prompt_length + (self.block + 1) * self.block_len  # the oldest open block closes
        self.finished |= _finished_rows(
            self.x[:, self.prompt_length : end], self.eos if self.cfg.stop_at_eos else None, self.cfg.stop
        )
        self.block += 1
        self.block_steps = None
        self.done = self.block == self.cfg.num_blocks or bool(self.finished.all())

    def reindex(self, index: Tensor) -> None:
        """Row ``i`` becomes a copy of row ``index[i]`` (``[B]``): canvas, history of decoding,
        cached logits, KV cache and policy state. NFE stays with the row slot (it counts work done)."""
        for name in ("x", "step_map", "logprobs", "finished", "times"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index.to(value.device)])
        self.logits.reindex(index)
        if hasattr(self.policy, "reindex"):
            self.policy.reindex(index)

    def load(self, rows: Tensor, tokens: Tensor, step_map: Tensor, logprobs: Tensor) -> None:
        """Set the generation of ``rows`` (``[B]`` bool) to ``tokens``, ``step_map`` and ``logprobs``
        (each ``[rows.sum(), G]``, canvas view: the mask token where not decoded)."""
        P = self.prompt_length
        self.x[rows, P:] = tokens.to(self.x.dtype)
        self.step_map[rows, P:] = step_map.to(self.step_map.dtype)
        self.logprobs[rows, P:] = logprobs.double()
        self.logits.changed(rows)

    def text(self) -> Tensor:
        """The text view of the canvas (EOS after a finished row's first EOS)."""
        return (
            self.x
            if self.eos is None
            else _fill_after_eos(self.x, self.prompt_length, self.finished, self.eos, self.mask_id)
        )

    def output(self) -> DecodeOutput:
        out = DecodeOutput(
            self.text(),
            self.step_map,
            self.logprobs,
            self.logits.nfe,
            self.logits.calls,
            self.prompt_length,
            self.history,
            self.times,
            canvas=self.x,
        )
        return out if not self.extra else _strip_columns(out, self.extra)


def _align_to_model_blocks(
    cfg: DecodeConfig, model: nn.Module, prompt_ids: Tensor, attention_mask: Tensor | None, mask_id: int
) -> tuple[Tensor, Tensor | None, int]:
    """Left-pad the prompt so the generation starts on a model-block boundary of a block-causal
    model (RoPE positions unchanged); returns the padded prompt, its mask and the columns added."""
    model_block = block_causal_size(model)
    if model_block is None:
        return prompt_ids, attention_mask, 0
    block_len = cfg.gen_length // cfg.num_blocks
    if block_len % model_block:
        raise ValueError(
            f"block_length={block_len} is not a multiple of the model's block size {model_block}; "
            f"a block-causal model decodes whole blocks (use block_length={model_block})"
        )
    extra = (-prompt_ids.shape[1]) % model_block
    if extra:
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_ids)
        prompt_ids = torch.cat([prompt_ids.new_full((prompt_ids.shape[0], extra), mask_id), prompt_ids], dim=1)
        attention_mask = torch.cat([attention_mask.new_zeros((attention_mask.shape[0], extra)), attention_mask], 1)
    return prompt_ids, attention_mask, extra


def _strip_columns(out: DecodeOutput, n: int) -> DecodeOutput:
    """Drop the ``n`` alignment columns added on the left of the prompt."""
    return DecodeOutput(
        out.tokens[:, n:],
        out.step_map[:, n:],
        out.logprobs[:, n:],
        out.nfe,
        out.model_calls,
        out.prompt_length - n,
        [h[:, n:] for h in out.history],
        None if out.times is None else out.times[:, n:],
        canvas=out.canvas[:, n:],
    )


def _finished_rows(generated: Tensor, eos: int | None, stop: Callable[[Tensor], Tensor] | None) -> Tensor:
    done = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
    if eos is not None:
        done |= (generated == eos).any(dim=1)
    if stop is not None:
        done |= stop(generated).to(device=generated.device, dtype=torch.bool)
    return done


def _fill_after_eos(x: Tensor, P: int, finished: Tensor, eos: int, mask_id: int) -> Tensor:
    """The text view of canvas ``x``: in finished rows everything after the first EOS (or never
    decoded) reads EOS. ``x`` itself, with ``step_map`` and ``logprobs``, keeps what was decoded."""
    tokens = x.clone()
    gen = tokens[:, P:]
    is_eos = gen == eos
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    gen[finished[:, None] & (after | (gen == mask_id))] = eos
    return tokens
