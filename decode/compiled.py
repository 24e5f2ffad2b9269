"""Compiled decoding (``compile: true``, ``--compile``): the cached forward as a graph.

A decoding step's model call has three parts: host-side preparation (checks, the attention mask,
RoPE's cos/sin — :meth:`DLMModel.prepare`), the transformer itself (:meth:`DLMModel.trunk`) and the
LM head at the positions the decoder scores (:meth:`DLMModel.head`, ``[N, V]`` rows). Only the trunk
runs under ``torch.compile``: its shapes are fixed once the cache is static (attention reads every
slot, the never-written ones masked out — :meth:`KVCache.make_static`) and the fed columns are padded
to a *bucket* (:func:`bucket`). A padded column repeats the call's last fed column — same token, same
slot, same position — so it rewrites that slot with the same keys and values and is never scored:
the padded call computes what the unpadded one does. A decode therefore compiles at most one graph
per bucket it meets (the dual cache: two, its block and the full forward at a block start).

On CUDA the graphs are captured as CUDA graphs (``mode="reduce-overhead"``), which removes the
per-kernel launch cost that dominates small cached forwards; on CPU inductor fuses the elementwise
work. Where compiling fails (no compiler, an unsupported Python or platform), the first failing call
warns once and decoding continues uncompiled with the same results.

Models other than dlm's own (no ``cache`` / ``output_mask`` support) decode without a cache over the
whole canvas, a fixed shape: the whole model is compiled.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor, nn

from dlm.model.cache import KVCache
from dlm.model.modeling import logits_of, unwrapped

#: graphs one decode may compile before torch.compile gives up on new shapes (dynamo's recompile limit)
MAX_GRAPHS = 64


def bucket(n: int, limit: int) -> int:
    """The padded length of a call feeding ``n`` columns of a ``limit``-column canvas: the smallest of
    ``8, 10, 12, 14, 16, 20, 24, 28, 32, 40, …`` (four steps per octave, at most 25% padding) that is
    at least ``n``, and never more than ``limit``. Lengths up to ``limit`` meet at most
    ``4 · log2(limit / 8) + 2`` buckets."""
    if n >= limit:
        return limit
    size = 8
    while size < n:
        octave = 1 << (size.bit_length() - 1)
        size += octave // 4
    return min(size, limit)


def backend_of(setting):
    """The ``torch.compile`` backend of a ``compile`` setting: ``True`` = inductor, else the backend
    itself (a name, or a callable ``(graph_module, example_inputs) -> callable``)."""
    return "inductor" if setting is True else setting


def check_backend(name: str) -> None:
    """Refuse a ``compile`` backend torch does not have, listing those it has."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ValueError(
            f"compile={name!r} is not a torch.compile backend; use true (inductor) or one of {', '.join(sorted(known))}"
        )


def default_mode(device: torch.device) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA, inductor's ``default`` elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


class Lease:
    """Held by the user of a lent cache (a runner); the cache returns to the pool once the lease is garbage."""


class CompiledForward:
    """Calls like the model (``input_ids``, ``attention_mask``, ``output_mask``, ``cache``, ``cache_slots``)
    and returns its logits, running the trunk compiled over bucketed shapes.

    Every cached call goes through a static cache of ``bucket(T)`` slots for a ``T``-column canvas, so
    prompts of different lengths share graphs. A cache-less call over an unpadded canvas runs as it is
    (no mask: the fastest attention kernels; a graph per canvas length); over a ragged batch it uses a
    scratch static cache, whose slots it rewrites. Caches are lent to decodes (:meth:`lend`) and reused
    once their decode is over: their addresses stay fixed, which CUDA graphs need. ``backend`` / ``mode``
    go to ``torch.compile`` (``mode=None``: :func:`default_mode`); ``shapes`` records the trunk shapes met.
    """

    def __init__(self, model: nn.Module, backend: str = "inductor", mode: str | None = None):
        model = _inner(model)
        self._model = weakref.ref(model)  # held weakly: the per-model registry must not keep the model alive
        device = next(model.parameters()).device
        self.mode = default_mode(device) if mode is None and backend == "inductor" else mode
        self.whole = not getattr(model, "supports_kv_cache", False)
        self.eager = _whole if self.whole else type(model).trunk  # functions of (model, ...)
        options = {"mode": self.mode} if self.mode is not None else {}
        self.backend = backend if isinstance(backend, str) else getattr(backend, "__name__", str(backend))
        self.compiled = torch.compile(self.eager, backend=backend, dynamic=False, fullgraph=not self.whole, **options)
        self.failed: str | None = None  # why compiling failed; decoding then runs uncompiled
        self.shapes: set[tuple[int, ...]] = set()
        self.pool: dict[tuple[int, int], list[KVCache]] = {}  # (batch, slots) -> caches
        self.busy: set[int] = set()  # ids of lent caches
        self.scratch: dict[tuple[int, int], KVCache] = {}

    @property
    def model(self) -> nn.Module:
        return self._model()

    def slots(self, length: int) -> int:
        """The slots of a static cache for a ``length``-column canvas: its bucket."""
        return bucket(length, max(length, self.model.config.max_position_embeddings))

    def lend(self, batch: int, length: int) -> tuple[KVCache, Lease]:
        """An empty static cache for a ``batch × length`` canvas, lent until its lease is garbage."""
        key = (batch, self.slots(length))
        free = [c for c in self.pool.setdefault(key, []) if id(c) not in self.busy]
        if free:
            cache = free[0]
            cache.valid.zero_()
        else:
            cache = KVCache.for_model(self.model, *key).make_static()
            self.pool[key].append(cache)
        self.busy.add(id(cache))
        lease = Lease()
        weakref.finalize(lease, self.busy.discard, id(cache))
        return cache, lease

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw) -> Tensor:
        if self.whole:
            return logits_of(
                self._run(lambda fn: fn(self.model, input_ids=input_ids, attention_mask=attention_mask, **kw))
            )
        cache: KVCache | None = kw.get("cache")
        slots, output_mask = kw.get("cache_slots"), kw.get("output_mask")
        model = self.model
        if cache is None and attention_mask is None:  # the whole canvas, unpadded: no mask, the fastest kernels
            spec, cos, sin = model.prepare(input_ids)
            self.shapes.add(tuple(input_ids.shape))  # one graph per canvas length
            return model.head(
                self._run(lambda fn: fn(model, input_ids.contiguous(), cos, sin, spec, None)), output_mask
            )
        if cache is None:  # the whole canvas of a ragged batch, over a scratch cache whose slots it rewrites
            key = (input_ids.shape[0], self.slots(input_ids.shape[1]))
            if key not in self.scratch:
                self.scratch[key] = KVCache.for_model(model, *key).make_static()
            cache = self.scratch[key]
            cache.valid.zero_()
        elif not cache.static:
            raise ValueError("a compiled forward needs a static cache (CompiledForward.lend)")
        S = cache.max_len
        if attention_mask is not None and attention_mask.shape[1] < S:  # slots past the canvas: never attended
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_zeros(len(attention_mask), S - attention_mask.shape[1])], 1
            )
        input_ids, slots, output_mask = _pad(input_ids, slots, output_mask, bucket(input_ids.shape[1], S))
        input_ids = input_ids.contiguous()  # a slice of the canvas has the canvas's stride: a graph per canvas
        spec, cos, sin = model.prepare(input_ids, attention_mask, cache=cache, cache_slots=slots)
        self.shapes.add((*input_ids.shape, S))
        hidden = self._run(lambda fn: fn(model, input_ids, cos, sin, spec, cache))
        return model.head(hidden, output_mask)

    def _run(self, call):
        """``call(compiled)``; on a compile failure, warn once and use the eager function from then on."""
        if self.failed is None:
            try:
                with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS, accumulated_recompile_limit=4 * MAX_GRAPHS):
                    return call(self.compiled)
            except Exception as error:  # noqa: BLE001 - any compiler failure; an error of the call itself re-raises below
                out = call(self.eager)
                self.failed = _reason(error)
                warnings.warn(
                    f"compile={self.backend!r}: torch.compile failed ({self.failed}); decoding continues uncompiled",
                    stacklevel=4,
                )
                return out
        return call(self.eager)


def compiled_forward(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> CompiledForward:
    """The model's compiled forward, one per model and settings: graphs and caches serve every decode.
    A wrapper that times or otherwise intercepts the model's calls provides its own ``compiled_forward``."""
    if hasattr(model, "compiled_forward"):
        return model.compiled_forward(backend, mode)
    per_model = _COMPILED.setdefault(model, {})
    if (backend, mode) not in per_model:
        per_model[(backend, mode)] = CompiledForward(model, backend, mode)
    return per_model[(backend, mode)]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pad(input_ids: Tensor, slots: Tensor | None, output_mask: Tensor | None, size: int):
    """Pad the fed columns to ``size`` by repeating the last one (same token and slot; never scored)."""
    B, n = input_ids.shape
    if slots is None:
        slots = torch.arange(n, device=input_ids.device).expand(B, -1)
    if size == n:
        return input_ids, slots, output_mask
    extra = size - n
    input_ids = torch.cat([input_ids, input_ids[:, -1:].expand(B, extra)], dim=1)
    slots = torch.cat([slots, slots[:, -1:].expand(B, extra)], dim=1)
    if output_mask is not None:
        output_mask = torch.cat([output_mask, output_mask.new_zeros(B, extra)], dim=1)
    return input_ids, slots, output_mask


def _inner(model: nn.Module) -> nn.Module:
    """The module whose trunk runs: an engine's wrapper unwrapped, a peft model's base model (its LoRA
    layers are in it)."""
    model = unwrapped(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _reason(error: BaseException) -> str:
    """The root cause of a compile failure, in one line (dynamo wraps the backend's own error)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _whole(model: nn.Module, **kw):
    return model(**kw)
