"""Decoding benchmark: decoders × caches × generation lengths × batch sizes.

    dlm bench decode --shape small --gen-lengths 256,1024 --batch-sizes 1,8 --json bench.json
    dlm bench decode --checkpoint runs/repeat-task --task repeat --caches none,dual

The model is a checkpoint or a named benchmark shape with random weights (speed does not
depend on the weights). Per run: NFE (mean per row), model calls, wall time (= the latency of
the batch: prefill included), model time measured inside the forward (synchronised on CUDA)
and the sampler overhead (the rest), generated tokens/s (prompt tokens excluded), peak
memory (CUDA: allocator peak; CPU: peak resident-set growth, sampled), and with ``--task`` the
task score of the generations. Speedups are against the same decoder without a cache at the
same length, batch and steps; ``combined`` is threshold decoding + the given cache against
one-token-per-step confidence decoding without a cache. ``--compile on|both`` decodes with the
compiled forward (cache column ``+c``; ``both`` also uncompiled, side by side): a compiled row
decodes once untimed first (``compile_s`` in the JSON), and ``compile`` is its speedup over the
same row uncompiled. A table goes to the terminal, every figure to ``--json``.
Expected NFE: first_hitting exactly L; ancestral with the no-change cache N·(1 − (1 − 1/N)^L)
for one block (per block with semi-AR).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from dlm.decode import build_decoder
from dlm.decode.caches import supported_caches
from dlm.decode.compiled import compiled_forward
from dlm.model import DLMConfig, DLMModel
from dlm.tasks import score
from dlm.utils import torch_dtype, write_json


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    extra: tuple[tuple[str, object], ...] = ()
    """Further DLMConfig fields (a published family's features: biases, QK-norm, shift, blocks)."""

    def config(self, **fields) -> DLMConfig:
        return DLMConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            **({"intermediate_size": self.intermediate_size} if self.intermediate_size else {}),
            **{**dict(self.extra), **fields},
        )


SHAPES = {
    "tiny": Shape(128, 4, 4, 0, 32768),  # 0 = SwiGLU's default 8/3 expansion
    "small": Shape(256, 4, 4, 0, 32768),  # 11.6M
    "tiny-126k": Shape(128, 4, 4, 0, 126464),  # LLaDA's vocabulary on a small body: the LM head and sampler dominate
    "base": Shape(512, 8, 8, 0, 32768),  # 42.5M
    "llada-8b": Shape(4096, 32, 32, 12288, 126464, None, (("tie_word_embeddings", False),)),  # LLaDA-8B (8.0B)
    "dream-7b": Shape(  # Dream-v0-7B (7.6B): Qwen2 layout, q/k/v biases, shifted logits
        3584, 28, 28, 18944, 152064, 4, (("qkv_bias", True), ("logits_shift", True), ("tie_word_embeddings", False)),
    ),
    "sdar-8b": Shape(  # SDAR-8B-Chat (8.2B): Qwen3 layout, QK-norm, block-causal in blocks of 4
        4096, 36, 32, 12288, 151936, 8, (("head_dim", 128), ("qk_norm", True), ("attention_mode", "block_causal"),
                                         ("block_size", 4), ("tie_word_embeddings", False)),
    ),
}  # fmt: skip


class TimedModel(nn.Module):
    """Wraps a model and accumulates the wall time spent in its forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config, self.seconds = model, model.config, 0.0
        self.supports_output_mask = getattr(model, "supports_output_mask", False)
        self.supports_kv_cache = getattr(model, "supports_kv_cache", False)

    def forward(self, **kwargs):
        return self.timed(self.model, **kwargs)

    def timed(self, fn, *args, **kwargs):
        sync = torch.cuda.synchronize if next(self.model.parameters()).is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        self.seconds += time.perf_counter() - t0
        return out

    def compiled_forward(self, backend: str, mode: str | None):
        """Compiled decoding times the inner model's compiled forward."""
        return TimedCall(self, compiled_forward(self.model, backend, mode))


class TimedCall:
    """A compiled forward whose calls are timed by a :class:`TimedModel`."""

    def __init__(self, timer: TimedModel, call):
        self.timer, self.call = timer, call

    def lend(self, batch: int, length: int):
        return self.call.lend(batch, length)

    def __call__(self, **kwargs):
        return self.timer.timed(self.call, **kwargs)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or on CPU the peak growth of the resident set
    (sampled every 10 ms by a thread)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak_mb = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc = psutil.Process()
            self.base = self.top = self.proc.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.top = max(self.top, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak_mb = (max(self.top, self.proc.memory_info().rss) - self.base) / 2**20


def expected_ancestral_nfe(steps: int, length: int, blocks: int) -> float:
    n, l = steps // blocks, length // blocks
    return blocks * n * (1 - (1 - 1 / n) ** l)


def decoder_grid(
    steps: int, block: int, threshold: float, open_next_at: float = 0.5, max_open_blocks: int = 2
) -> dict[str, tuple[str, dict]]:
    return {
        "ancestral": ("ancestral", {"steps": steps, "block_length": block}),
        "first_hitting": ("first_hitting", {"block_length": block}),
        "confidence": ("confidence", {"steps": steps, "block_length": block}),
        "threshold": (
            "confidence",
            {"steps": steps, "block_length": block, "rule": "threshold", "threshold": threshold},
        ),
        "pipelined": (
            "confidence",
            {"steps": steps, "block_length": block, "rule": "threshold", "threshold": threshold,
             "open_next_at": open_next_at, "max_open_blocks": max_open_blocks},
        ),
    }  # fmt: skip


def bench_row(args, model: TimedModel, label, name, kw, cache, compiled, gen_length, steps, prompt, pad) -> dict:
    """Decode once with these settings and time it; a compiled row first decodes once untimed
    (``compile_s``: the graphs it compiles), then times a decode over the compiled graphs."""
    decoder = build_decoder(
        name,
        gen_length=gen_length,
        eos_token_id=None,
        cache=cache,
        refresh_every=args.refresh_every,
        compile=compiled,
        **({"temperature": 0.0} if args.task and name == "confidence" else {}),
        **kw,
    )
    compile_s = None
    if compiled:
        t0 = time.perf_counter()
        decoder(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0))
        compile_s = time.perf_counter() - t0
    model.seconds = 0.0
    with PeakMemory(args.device) as mem:
        t0 = time.perf_counter()
        out = decoder(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    nfe = out.nfe.double().mean().item()
    batch = prompt.shape[0]
    expected = {
        "first_hitting": float(gen_length),
        "ancestral": expected_ancestral_nfe(steps, gen_length, gen_length // args.block_length),
    }.get(label)
    return {
        "decoder": label,
        "cache": cache,
        "compiled": bool(compiled),
        "gen_length": gen_length,
        "batch_size": batch,
        "steps": steps,
        "nfe": nfe,
        "expected_nfe": expected,
        "model_calls": out.model_calls,
        "wall_s": wall,
        "latency_s": wall,
        "compile_s": compile_s,
        "model_s": model.seconds,
        "overhead": 1 - model.seconds / wall,
        "tokens_per_s": batch * gen_length / wall,
        "tokens_per_forward": gen_length / nfe,
        "peak_memory_mb": mem.peak_mb,
        "generated": out.generated,
    }


def format_row(row: dict, scored: bool) -> str:
    exp = f"{row['expected_nfe']:7.1f}" if row["expected_nfe"] is not None else f"{'—':>7s}"
    speed = f"{row['speedup_vs_no_cache']:6.2f}x" if row["speedup_vs_no_cache"] else f"{'—':>7s}"
    comp = f"{row['compile_speedup']:6.2f}x" if row["compile_speedup"] else f"{'—':>7s}"
    cache = row["cache"] + ("+c" if row["compiled"] else "")
    return (
        f"{row['decoder']:14s} {cache:>9s} {row['gen_length']:5d} {row['batch_size']:5d} {row['nfe']:7.1f} {exp} "
        f"{row['tokens_per_forward']:5.1f} {row['wall_s']:8.2f} {row['overhead']:8.1%} {row['tokens_per_s']:8.1f} "
        f"{speed} {comp} {row['peak_memory_mb']:7.1f}" + (f" {row['score']:6.3f}" if scored else "")
    )


def load_model(args) -> tuple[nn.Module, object | None, str]:
    """The benchmarked model, its tokenizer (checkpoints only) and a one-line description."""
    dtype = torch_dtype(args.dtype)
    if args.checkpoint:
        from dlm.loading import load

        model, tok, path = load(args.checkpoint, dtype=dtype, device=args.device)
        return model, tok, f"checkpoint {path}"
    shape = SHAPES[args.shape] if args.shape else Shape(args.hidden_size, args.layers, args.heads, 0, args.vocab_size)
    max_len = args.prompt_length + max(args.gen_lengths)
    config = shape.config(
        max_position_embeddings=max(1024, max_len),
        mask_token_id=shape.vocab_size - 1,
        **({"attention_mode": "block_causal", "block_size": args.model_block} if args.model_block else {}),
    )
    with torch.device(args.device):
        model = DLMModel(config).to(dtype=dtype).eval()
    return model, None, f"random weights, shape {args.shape or 'custom'}"


def parse_task_args(text: str | None) -> dict:
    """``"repeats=64,period=16"`` -> ``{"repeats": 64, "period": 16}`` (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            from dlm.config import ConfigError

            raise ConfigError(f"--task-args item {item!r} is not key=value (e.g. period=8,repeats=4)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def task_prompts(args, tok, batch: int):
    """Left-padded prompts of held-out task examples (seed 1; training uses seed 0) and the examples."""
    from dlm.data import encode_prompts
    from dlm.tasks import generate

    examples = generate(args.task, batch, seed=1, **parse_task_args(args.task_args))
    ids, mask = encode_prompts(tok, [e["prompt"] for e in examples])  # as the task model was SFT'd
    return ids.to(args.device), mask.to(args.device), examples


def memory_plan(model: nn.Module, dtype: torch.dtype, batch_sizes: list[int], lengths: list[int]) -> list[dict]:
    """Weights and KV-cache bytes of a model (built on the meta device: nothing is allocated).
    The cache holds K and V for every layer and canvas column: 2 · layers · kv_heads · head_dim."""
    cfg = model.config
    size = torch.finfo(dtype).bits // 8
    params = sum(p.numel() for p in model.parameters())
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size
    return [
        {"batch": b, "tokens": n, "params": params, "weights_gb": params * size / 2**30,
         "kv_cache_gb": per_token * b * n / 2**30}
        for b in batch_sizes
        for n in lengths
    ]  # fmt: skip


def main(args) -> int:
    """Every decoder x cache (x compile) row at every generation length and batch size."""
    torch.manual_seed(0)
    args.gen_lengths = [int(g) for g in str(args.gen_lengths).split(",")]
    batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    if args.device == "meta":  # a memory plan of the shape, no timing
        return _memory_plan(args, batch_sizes)
    inner, tok, what = load_model(args)
    model = TimedModel(inner)
    caches = _caches(args, inner, tok)
    n_params = sum(p.numel() for p in model.parameters())
    _print_header(args, inner, what, n_params)
    rows = []
    for gen_length in args.gen_lengths:
        for batch in batch_sizes:
            rows += _rows_at(args, model, tok, caches, gen_length, batch)
    for r in (r for r in rows if r["combined_vs_confidence_no_cache"]):
        print(
            f"combined: {r['decoder']} {args.threshold} + {r['cache']} vs confidence (1 token/step) without cache, "
            f"gen {r['gen_length']}, batch {r['batch_size']}: {r['combined_vs_confidence_no_cache']:.2f}x"
        )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        write_json(args.json, {"model": what, "params": n_params, "settings": settings, "results": rows})
    return 0


def _memory_plan(args, batch_sizes: list[int]) -> int:
    inner, _, what = load_model(args)
    dtype = torch_dtype(args.dtype)
    plan = memory_plan(inner, dtype, batch_sizes, [args.prompt_length + g for g in args.gen_lengths])
    print(f"dlm bench decode | {what} | {plan[0]['params'] / 1e9:.2f}B params | {args.dtype} | memory plan")
    for row in plan:
        print(f"batch {row['batch']:4d}  tokens {row['tokens']:6d}  weights {row['weights_gb']:7.2f} GiB  "
              f"KV cache {row['kv_cache_gb']:7.2f} GiB")  # fmt: skip
    if args.json:
        write_json(args.json, {"model": what, "dtype": args.dtype, "plan": plan})
    return 0


def _caches(args, inner, tok) -> list[str]:
    """The caches to run (``--caches``, default every one the model supports), checked."""
    caches = args.caches.split(",") if args.caches else supported_caches(inner)
    for cache in caches:
        if cache not in supported_caches(inner):
            raise SystemExit(
                f"dlm bench decode: cache {cache!r} is not supported by this model; "
                f"it supports {', '.join(supported_caches(inner))}"
            )
    if args.task and tok is None:
        raise SystemExit("dlm bench decode: --task needs --checkpoint (a model trained on the task and its tokenizer)")
    return caches


def _print_header(args, inner, what: str, n_params: int) -> None:
    cfg = inner.config
    print(
        f"dlm bench decode | {what} | {n_params / 1e6:.1f}M params (hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, {cfg.attention_mode}) | block {args.block_length} | "
        f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads)"
    )
    print(
        f"{'decoder':14s} {'cache':>9s} {'gen':>5s} {'batch':>5s} {'NFE':>7s} {'expect':>7s} {'TPF':>5s} "
        f"{'wall s':>8s} {'overhead':>8s} {'tok/s':>8s} {'speedup':>7s} {'compile':>7s} {'mem MB':>7s}"
        + (f" {'score':>6s}" if args.task else ""),
        flush=True,
    )


def _rows_at(args, model, tok, caches: list[str], gen_length: int, batch: int) -> list[dict]:
    """The rows of one generation length and batch size, each printed as it finishes, with its
    speedups over the same decoder without cache (and without compile)."""
    steps = gen_length if args.steps is None else args.steps
    grid = decoder_grid(steps, args.block_length, args.threshold, args.open_next_at, args.max_open_blocks)
    wanted = args.decoders.split(",") if args.decoders else ["ancestral", "first_hitting", "confidence", "threshold"]
    if args.task:
        prompt, pad, examples = task_prompts(args, tok, batch)
    else:
        prompt = torch.randint(0, model.config.vocab_size - 1, (batch, args.prompt_length), device=args.device)
        pad, examples = None, None
    baseline: dict[str, float] = {}  # decoder -> wall s without cache or compile
    uncompiled: dict[tuple[str, str], float] = {}  # (decoder, cache) -> wall s without compile
    rows = []
    for label in wanted:
        name, kw = grid[label]
        for cache in caches:
            for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                row = bench_row(args, model, label, name, kw, cache, compiled, gen_length, steps, prompt, pad)
                generated = row.pop("generated", None)
                if examples is not None:
                    texts = tok.batch_decode(generated, skip_special_tokens=True)
                    row["score"] = sum(score(args.task, e, t) for e, t in zip(examples, texts)) / len(texts)
                if not compiled:
                    uncompiled[(label, cache)] = row["wall_s"]
                    if cache == "none":
                        baseline[label] = row["wall_s"]
                ref, plain = baseline.get(label), uncompiled.get((label, cache))
                row["speedup_vs_no_cache"] = ref / row["wall_s"] if ref else None
                row["combined_vs_confidence_no_cache"] = (
                    baseline["confidence"] / row["wall_s"]
                    if label in ("threshold", "pipelined") and "confidence" in baseline
                    else None
                )
                row["compile_speedup"] = plain / row["wall_s"] if compiled and plain else None
                rows.append(row)
                print(format_row(row, examples is not None), flush=True)
    return rows
