"""KV-cache policies for decoding, one interface (docs/caches.md).

A policy turns "logits of block ``[start, end)`` of canvas ``x``" into model calls that feed
only some canvas columns; the rest of the attention reads K/V kept in a position-indexed
:class:`~dlm.model.cache.KVCache` (slot = canvas column, so RoPE positions are always the true
ones, whatever order tokens are fed in).

* ``none`` — every call feeds the whole canvas.
* ``exact`` — block-causal (BD3-LM) models: finished blocks never change and no earlier block
  attends to a later one, so their clean K/V are final. Each call feeds ``[committed, end)``;
  the output equals no cache exactly.
* ``prefix`` — Fast-dLLM prefix cache: the first call of a block is a full forward that caches
  every column; later calls in the block feed ``[start, T)`` (the block and everything after
  it) and read the prefix ``[0, start)`` from the cache. On a block-causal model this is exact.
* ``dual`` — Fast-dLLM dual cache: like ``prefix`` but later calls feed only the block
  ``[start, end)``; the suffix K/V are the ones computed at the block's first call.
* ``delayed`` — dKV-Cache-Decode: a column's K/V are reused once they were computed from its
  decoded token, i.e. one call after it is decoded (a just-decoded token is fed once more with
  its real identity); masked columns are fed at every call; a full forward recomputes everything
  at each block start and every ``refresh_every`` calls. ``refresh_every = 1`` is no cache.

``prefix``, ``dual`` and ``delayed`` approximate a bidirectional model (cached K/V were computed
against an older canvas); the decode benchmark reports the quality they keep.

A shifted model (``config.logits_shift``: column ``c``'s logits come from hidden state ``c − 1``)
needs the column before each scored one in the same call: contiguous calls start one column
early, and the delayed cache feeds the predecessor of every masked block column too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlm.decode import CACHES
from dlm.model.cache import KVCache
from dlm.model.modeling import is_shifted, logits_of


def supported_caches(model: nn.Module) -> list[str]:
    """The caches a model can decode with."""
    if not getattr(model, "supports_kv_cache", False):
        return ["none"]
    mode = getattr(getattr(model, "config", None), "attention_mode", "bidirectional")
    if mode == "block_causal":
        return ["none", "exact", "prefix", "dual", "delayed"]
    if mode == "causal":
        return ["none"]  # a causal model is decoded autoregressively, not by these decoders
    return ["none", "prefix", "dual", "delayed"]


def check_cache(model: nn.Module, cache: str) -> None:
    ok = supported_caches(model)
    if cache in ok:
        return
    mode = getattr(getattr(model, "config", None), "attention_mode", "bidirectional")
    if not getattr(model, "supports_kv_cache", False):
        why = "a model that takes a KVCache (a dlm model)"
    elif cache == "exact":
        why = f"a block-causal (BD3-LM) model; this model is {mode}"
    else:
        why = f"a bidirectional or block-causal model; this model is {mode}"
    raise ValueError(f"cache={cache!r} needs {why}. Caches it supports: {', '.join(ok)}")


class Runner:
    """Computes the logits of a block's candidate positions, feeding what the cache policy says.

    A call returns ``[N, V]``: one row per ``True`` of ``wanted`` (``[B, end - start]``, the block's
    positions a policy may read — its masked positions by default), in row-major order. dlm models
    (``block_only``) compute the LM head at exactly those columns; others return the whole canvas,
    from which the rows are taken. Nothing of size ``[B, Tb, V]`` is built.
    """

    def __init__(self, model: nn.Module, block_only: bool, mask_id: int, call=None):
        self.model, self.block_only, self.mask_id = model, block_only, mask_id
        self.call = call or model  # the model, or its compiled forward (``decode/compiled.py``)
        self.lease = None  # held while a compiled forward lends this runner its static cache
        self.shifted = is_shifted(model)

    def reindex(self, index: Tensor) -> None:
        """Rows follow ``index`` (row ``i`` becomes row ``index[i]``): the whole-canvas runner keeps no row state."""

    def __call__(
        self, x: Tensor, pad: Tensor | None, start: int, end: int, new_block: bool, wanted: Tensor | None = None
    ) -> Tensor:
        return self.full(x, pad, start, end, self.wanted(x, start, end, wanted))

    def wanted(self, x: Tensor, start: int, end: int, wanted: Tensor | None) -> Tensor:
        """The positions to score: ``wanted``, or by default every masked position of the block."""
        return x[:, start:end] == self.mask_id if wanted is None else wanted

    def full(
        self, x: Tensor, pad: Tensor | None, start: int, end: int, wanted: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        """A forward over the whole canvas (writing every column to ``cache`` when given)."""
        if not self.block_only:
            if pad is None:
                return logits_of(self.call(input_ids=x))[:, start:end][wanted]
            return logits_of(self.call(input_ids=x, attention_mask=pad))[:, start:end][wanted]
        return self.fed(x, pad, cache, 0, x.shape[1], start, end, wanted)

    def fed(
        self,
        x: Tensor,
        pad: Tensor | None,
        cache: KVCache | None,
        lo: int,
        hi: int,
        start: int,
        end: int,
        wanted: Tensor,
    ) -> Tensor:
        """Feed the contiguous columns ``[lo, hi)`` (``lo <= start``, ``end <= hi``), over ``cache`` if given;
        a shifted model is also fed column ``start − 1``, whose hidden state scores column ``start``."""
        B = x.shape[0]
        if self.shifted and lo == start > 0:
            lo = start - 1
        keep = torch.zeros(B, hi - lo, dtype=torch.bool, device=x.device)
        keep[:, start - lo : end - lo] = wanted
        kw = {}
        if cache is not None:
            kw = {"cache": cache, "cache_slots": torch.arange(lo, hi, device=x.device).expand(B, -1)}
        return logits_of(self.call(input_ids=x[:, lo:hi], attention_mask=pad, output_mask=keep, **kw))


class ExactRunner(Runner):
    def __init__(self, model: nn.Module, cache: KVCache, mask_id: int, call=None):
        super().__init__(model, True, mask_id, call)
        self.cache = cache
        self.committed = 0  # columns [0, committed) are final and their clean K/V are cached

    def reindex(self, index: Tensor) -> None:
        self.cache.reindex(index)

    def __call__(self, x, pad, start, end, new_block, wanted=None):
        lo = min(self.committed, start)
        logits = self.fed(x, pad, self.cache, lo, end, start, end, self.wanted(x, start, end, wanted))
        self.committed = start
        return logits


class PrefixRunner(Runner):
    """Prefix (``dual=False``) and dual (``dual=True``) caches."""

    def __init__(self, model: nn.Module, cache: KVCache, mask_id: int, dual: bool, call=None):
        super().__init__(model, True, mask_id, call)
        self.cache, self.dual = cache, dual

    def reindex(self, index: Tensor) -> None:
        self.cache.reindex(index)

    def __call__(self, x, pad, start, end, new_block, wanted=None):
        wanted = self.wanted(x, start, end, wanted)
        if new_block:
            return self.full(x, pad, start, end, wanted, self.cache)
        return self.fed(x, pad, self.cache, start, end if self.dual else x.shape[1], start, end, wanted)


class DelayedRunner(Runner):
    def __init__(self, model: nn.Module, cache: KVCache, mask_id: int, refresh_every: int, call=None):
        super().__init__(model, True, mask_id, call)
        self.cache, self.refresh_every = cache, refresh_every
        self.seen: Tensor | None = None  # [B, T] token whose K/V each slot holds (-1: none)
        self.since_refresh = 0  # model calls since the last full forward

    def reindex(self, index: Tensor) -> None:
        self.cache.reindex(index)
        if self.seen is not None:
            self.seen = self.seen[index]

    def __call__(self, x, pad, start, end, new_block, wanted=None):
        B, T = x.shape
        wanted = self.wanted(x, start, end, wanted)
        if self.seen is None:
            self.seen = torch.full_like(x, -1)
        stale = (x != self.seen) | (x == self.mask_id)
        if self.shifted:  # each masked block column's logits come from the column before (column 0's from itself)
            lo = max(start, 1)
            stale[:, lo - 1 : end - 1] |= x[:, lo:end] == self.mask_id
        if pad is not None:
            stale &= pad.bool()  # padding is never attended to: nothing to recompute
        refresh = new_block or self.since_refresh >= self.refresh_every
        self.since_refresh = 1 if refresh else self.since_refresh + 1
        if refresh:
            logits = self.full(x, pad, start, end, wanted, self.cache)
            self.seen.copy_(x)
            return logits
        # feed each row's stale columns (sorted; short rows repeat their last column, which
        # rewrites the same K/V) — the current block's masked columns are always among them
        count = stale.sum(dim=1)
        n = max(int(count.max()), 1)  # rows with nothing stale feed column ``start``, unscored
        order = torch.where(stale, torch.arange(T, device=x.device), T).sort(dim=1).values[:, :n]
        last = order.gather(1, (count - 1).clamp(min=0)[:, None])
        slots = torch.where(order < T, order, last)
        slots = torch.where(count[:, None] > 0, slots, torch.full_like(slots, start))
        tokens = x.gather(1, slots)
        first = torch.ones_like(slots, dtype=torch.bool)
        first[:, 1:] = slots[:, 1:] != slots[:, :-1]  # score each column once
        scored = torch.zeros_like(x, dtype=torch.bool)
        scored[:, start:end] = wanted  # wanted columns are masked, hence stale: every one is fed
        keep = scored.gather(1, slots) & first
        # slots increase along a row, so the rows come out in the row-major order of ``wanted``
        logits = logits_of(
            self.call(input_ids=tokens, attention_mask=pad, cache=self.cache, cache_slots=slots, output_mask=keep)
        )
        self.seen.scatter_(1, slots, tokens)
        return logits


def make_runner(
    name: str,
    model: nn.Module,
    batch: int,
    length: int,
    mask_id: int,
    refresh_every: int,
    block_only: bool,
    call=None,
) -> Runner:
    """The runner of cache policy ``name``; ``call`` replaces the model's own forward (compiled decoding)."""
    if name == "none":
        return Runner(model, block_only, mask_id, call)
    if name not in CACHES:
        raise ValueError(f"cache={name!r}; choose one of {', '.join(CACHES)}")
    lease = None
    if hasattr(call, "lend"):  # a compiled forward lends a static cache for as long as the runner holds the lease
        cache, lease = call.lend(batch, length)
    else:
        cache = KVCache.for_model(model, batch, length)
    if name == "exact":
        runner = ExactRunner(model, cache, mask_id, call)
    elif name in ("prefix", "dual"):
        runner = PrefixRunner(model, cache, mask_id, dual=name == "dual", call=call)
    else:
        runner = DelayedRunner(model, cache, mask_id, refresh_every, call)
    runner.lease = lease
    return runner
