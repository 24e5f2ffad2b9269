"""Training throughput: step time of each objective on the same backbone and batch.

    dlm bench train --hidden-size 512 --layers 8 --vocab-size 32768 --seq-len 256 --batch-size 8

A step is forward + backward + AdamW update, timed after warm-up with random weights and
random tokens. Figures of merit: MDLM ÷ AR step time (target ≤ 1.10) and vectorised BD3-LM ÷ AR
(target ≤ 2.2; BD3-LM's forward runs over 2L tokens with an explicit mask).
"""

from __future__ import annotations

import statistics
import time

import torch

from dlm.model import DLMConfig, DLMModel
from dlm.train.objectives import build_objective
from dlm.utils import torch_dtype, write_json


def time_objective(
    name: str, model: DLMModel, batch: dict, steps: int, warmup: int, device: str, block_size: int = 16
) -> list[float]:
    objective = build_objective(name, mask_token_id=model.config.mask_token_id, block_size=block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        noise = objective.sample_noise(tuple(batch["input_ids"].shape), gen)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = objective.loss(model, batch, noise)
        (out.total / out.count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(args) -> int:
    torch.manual_seed(0)
    dtype = torch_dtype(args.dtype)
    config = DLMConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=max(1024, args.seq_len),
        mask_token_id=args.vocab_size - 1,
    )
    model = DLMModel(config).to(device=args.device, dtype=dtype).train()
    batch = {"input_ids": torch.randint(0, args.vocab_size - 1, (args.batch_size, args.seq_len), device=args.device)}
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"dlm bench train | {n_params / 1e6:.1f}M params (hidden {args.hidden_size}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab_size}) | batch {args.batch_size} x {args.seq_len} | "
        f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads)"
    )
    results = {}
    for name in args.objectives.split(","):
        times = time_objective(name, model, batch, args.steps, args.warmup, args.device, args.block_size)
        med = statistics.median(times)
        results[name] = {
            "median_s": med,
            "mean_s": statistics.mean(times),
            "min_s": min(times),
            "tokens_per_s": args.batch_size * args.seq_len / med,
        }
        print(f"  {name:12s} median {med * 1000:8.1f} ms/step  ({results[name]['tokens_per_s']:,.0f} tokens/s)")
    if "ar" in results:
        for name in results:
            if name != "ar":
                ratio = results[name]["median_s"] / results["ar"]["median_s"]
                results[name]["ratio_to_ar"] = ratio
                print(f"  {name} / ar step time: {ratio:.3f}")
    if args.json:
        write_json(args.json, {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "results": results})
    return 0
