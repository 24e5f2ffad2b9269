"""Decoder benchmark: where the time goes (model vs sampler) and how many model calls.

    dlm bench decode --hidden-size 128 --layers 4 --vocab-size 32768 --gen-lengths 256,1024

A random-weight model of the given shape (speed does not depend on the weights) decodes a
batch of prompts with each decoder. Model time is measured inside the forward (synchronised
on CUDA); sampler overhead is the rest of the wall time. Generated tokens only count toward
tokens/s; the prompt's prefill is part of every model call and of the wall time.
Expected NFE: first_hitting exactly L; ancestral with the no-change cache N·(1 − (1 − 1/N)^L)
for one block (per block with semi-AR).
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from dlm.decode import build_decoder
from dlm.model import DLMConfig, DLMModel


class TimedModel(nn.Module):
    """Wraps a model and accumulates the wall time spent in its forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config, self.seconds = model, model.config, 0.0
        self.supports_output_mask = getattr(model, "supports_output_mask", False)
        self.supports_kv_cache = getattr(model, "supports_kv_cache", False)

    def forward(self, **kwargs):
        sync = torch.cuda.synchronize if next(self.model.parameters()).is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = self.model(**kwargs)
        sync()
        self.seconds += time.perf_counter() - t0
        return out


def expected_ancestral_nfe(steps: int, length: int, blocks: int) -> float:
    n, l = steps // blocks, length // blocks
    return blocks * n * (1 - (1 - 1 / n) ** l)


def decoder_grid(gen_length: int, steps: int, block: int) -> list[tuple[str, str, dict]]:
    return [
        ("ancestral", "ancestral", {"steps": steps}),
        ("first_hitting", "first_hitting", {}),
        ("confidence", "confidence", {"steps": steps, "block_length": block}),
        ("confidence+threshold", "confidence", {"steps": steps, "block_length": block, "rule": "threshold"}),
    ]


def main(args) -> int:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    max_len = args.prompt_length + max(int(g) for g in args.gen_lengths.split(","))
    config = DLMConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=max(1024, max_len),
        mask_token_id=args.vocab_size - 1,
        **({"attention_mode": "block_causal", "block_size": args.model_block} if args.model_block else {}),
    )
    model = TimedModel(DLMModel(config).to(device=args.device, dtype=dtype).eval())
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"dlm bench decode | {n_params / 1e6:.1f}M params (hidden {args.hidden_size}, {args.layers} layers, "
        f"vocab {args.vocab_size}{f', block-causal {args.model_block}' if args.model_block else ''}) | "
        f"batch {args.batch_size}, prompt {args.prompt_length} | {args.dtype} on "
        f"{args.device} ({torch.get_num_threads()} threads)"
    )
    header = (
        f"{'decoder':22s} {'cache':>6s} {'gen':>5s} {'steps':>5s} {'NFE':>7s} {'expected':>8s} {'wall s':>8s} "
        f"{'model s':>8s} {'overhead':>8s} {'tok/s':>8s}"
    )
    print(header)
    rows = []
    for gen_length in (int(g) for g in args.gen_lengths.split(",")):
        steps = gen_length if args.steps is None else args.steps
        prompt = torch.randint(0, args.vocab_size - 1, (args.batch_size, args.prompt_length), device=args.device)
        wanted = set(args.decoders.split(",")) if args.decoders else None
        runs = [
            (label, name, kw, cache)
            for label, name, kw in decoder_grid(gen_length, steps, args.block_length)
            for cache in args.caches.split(",")
        ]
        for label, name, kw, cache in runs:
            if wanted and label not in wanted:
                continue
            if args.model_block and "block_length" not in kw:
                kw = {**kw, "block_length": args.block_length}  # a block-causal model decodes whole blocks
            decoder = build_decoder(
                name, gen_length=gen_length, eos_token_id=None, cache=cache, **{"steps": steps, **kw}
            )
            model.seconds = 0.0
            t0 = time.perf_counter()
            out = decoder(model, prompt, generator=torch.Generator().manual_seed(0))
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            nfe = out.nfe.double().mean().item()
            expected = {
                "first_hitting": float(gen_length),
                "ancestral": expected_ancestral_nfe(
                    steps, gen_length, gen_length // kw.get("block_length", gen_length)
                ),
            }.get(label)
            row = {
                "decoder": label,
                "gen_length": gen_length,
                "steps": kw.get("steps", gen_length),
                "nfe": nfe,
                "expected_nfe": expected,
                "wall_s": wall,
                "model_s": model.seconds,
                "overhead": 1 - model.seconds / wall,
                "tokens_per_s": args.batch_size * gen_length / wall,
                "model_calls": out.model_calls,
            }
            rows.append(row)
            exp = f"{expected:8.1f}" if expected is not None else f"{'—':>8s}"
            print(
                f"{label:22s} {cache:>6s} {gen_length:5d} {row['steps']:5d} {nfe:7.1f} {exp} {wall:8.2f} "
                f"{model.seconds:8.2f} {row['overhead']:8.1%} {row['tokens_per_s']:8.1f}"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "func"}, "results": rows}, fh, indent=2)
    return 0
