"""``dlm tune``: sweep decoding settings on a task and pick the fastest that keeps the score.

    dlm tune runs/repeat-task --task repeat --task-args repeats=64 --gen-length 1024 \\
        --thresholds 0.7,0.9 --block-lengths 32 --caches none,dual --open-next-at 1,0 --out runs/tune

Every setting decodes the same held-out prompts (seed 1; training uses seed 0) greedily with the
confidence decoder. Per setting: the task score, NFE per row, tokens per forward (TPF = generated
tokens / NFE), wall time and tokens/s. The reference is one-token-per-step confidence decoding
without a cache (LLaDA's sampler: the slowest exact setting). The chosen setting is the fastest
(tokens/s) whose score is within ``--tolerance`` of the reference's; settings within 5% of the
fastest count as tied, and ties go to more tokens per forward, the higher score, the cache that
feeds fewer columns, then grid order. Scores, NFE and TPF are the same on every run with the same
seed; timings vary, so two settings of nearly equal speed may trade places.

Written to ``--out``: ``tune.json`` (every figure, the grid, skipped settings and why, versions,
dtype, device), ``pareto.png`` (score against TPF, the Pareto front, the choice) and
``preset.yaml`` (the chosen setting, for ``--preset``). AUP is the area under the Pareto front's
step curve (the best score reachable at a TPF of at least x), from TPF 1 to the largest measured.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlm.config import ConfigError
from dlm.utils import pyplot, save_figure, torch_dtype, write_json


@dataclass
class Result:
    settings: dict[str, Any]
    score: float
    nfe: float
    tpf: float
    wall_s: float
    tokens_per_s: float


def grid(args, gen_length: int, supported: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The settings to try and the ones skipped (with the reason)."""
    rules = [{"rule": "threshold", "threshold": t} for t in args.thresholds] + [
        {"rule": "factor", "factor": f} for f in args.factors
    ]
    tried, skipped = [], []
    for block, cache, rule, open_at in itertools.product(args.block_lengths, args.caches, rules, args.open_next_at):
        settings = {
            "gen_length": gen_length, "steps": gen_length, "block_length": block, "cache": cache, "temperature": 0.0,
            **rule, "open_next_at": open_at, "max_open_blocks": args.max_open_blocks,
        }  # fmt: skip
        why = None
        if gen_length % block:
            why = f"block_length {block} does not divide gen_length {gen_length}"
        elif cache not in supported:
            why = f"cache {cache!r} is not supported by this model (it supports {', '.join(supported)})"
        (skipped if why else tried).append({**settings, **({"why": why} if why else {})})
    return tried, skipped


def pareto(results: list[Result]) -> list[Result]:
    """The settings no other beats on both score and TPF, by increasing TPF."""
    front = [r for r in results if not any(o.score >= r.score and o.tpf > r.tpf or
                                           o.score > r.score and o.tpf >= r.tpf for o in results)]  # fmt: skip
    return sorted(front, key=lambda r: r.tpf)


def area_under_pareto(front: list[Result]) -> float:
    """∫ from 1 to max TPF of the best score reachable at TPF ≥ x (a step curve over the front)."""
    area, lo = 0.0, 1.0
    for r in front:  # increasing TPF, so scores decrease along the front
        area += r.score * max(0.0, r.tpf - lo)
        lo = max(lo, r.tpf)
    return area


#: at equal tokens per forward, the cache that feeds fewer columns per call is cheaper by construction
CACHE_COST = {"exact": 0, "dual": 1, "prefix": 2, "delayed": 3, "none": 4}


#: settings within this share of the best tokens/s count as equally fast (timings vary run to run)
SAME_SPEED = 0.05


def choose(results: list[Result], reference: Result, tolerance: float) -> Result:
    """The fastest setting (tokens/s) whose score is within ``tolerance`` of the reference's. Settings
    within 5% of the fastest count as tied; ties go to more tokens per forward, the higher score, the
    cache that feeds fewer columns, then the earlier setting of the grid. When no setting of the grid
    holds the score, the reference itself (one token per step) is the answer."""
    ok = [r for r in results if r.score >= reference.score - tolerance]
    if not ok:
        return reference
    fastest = max(r.tokens_per_s for r in ok)
    tied = [r for r in ok if r.tokens_per_s >= (1 - SAME_SPEED) * fastest]
    return min(tied, key=lambda r: (-r.tpf, -r.score, CACHE_COST.get(r.settings["cache"], 9), results.index(r)))


def run_setting(model, tok, task: str, examples, prompt, pad, settings: dict[str, Any], seed: int) -> Result:
    from dlm.decode import build_decoder
    from dlm.tasks import score

    decoder = build_decoder("confidence", eos_token_id=None, **settings)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = decoder(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(seed))
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    texts = tok.batch_decode(out.generated, skip_special_tokens=True)
    nfe = out.nfe.double().mean().item()
    G = settings["gen_length"]
    return Result(
        settings, sum(score(task, e, t) for e, t in zip(examples, texts)) / len(texts), nfe, G / nfe, wall,
        prompt.shape[0] * G / wall,
    )  # fmt: skip


def plot(path: Path, results: list[Result], front: list[Result], chosen: Result, reference: Result, title: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r.tpf for r in results], [r.score for r in results], s=18, color="0.6", label="settings")
    # the front as the best score reachable at a TPF of at least x (the curve AUP integrates), from x = 1
    xs, ys = [1.0] + [r.tpf for r in front], [front[0].score] + [r.score for r in front]
    ax.step(xs, ys, where="pre", color="C0", marker="o", markevery=list(range(1, len(xs))), label="Pareto front")
    ax.scatter([reference.tpf], [reference.score], marker="s", color="C3", label="reference (1 token/step)")
    ax.scatter([chosen.tpf], [chosen.score], marker="*", s=160, color="C2", label="chosen preset")
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.15)  # the front often runs along the top edge
    ax.set_xlabel("tokens per forward (log)")
    ax.set_ylabel("task score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def main(args) -> int:
    from tqdm.auto import tqdm

    import dlm
    from dlm.data import encode_prompts
    from dlm.decode.caches import supported_caches
    from dlm.decode.presets import write_preset
    from dlm.eval.bench_decode import parse_task_args
    from dlm.loading import load
    from dlm.tasks import generate

    dtype = torch_dtype(args.dtype)
    model, tok, path = load(args.checkpoint, dtype=dtype, device=args.device)
    if args.prompts < 1 or args.tolerance < 0:
        raise ConfigError(f"dlm tune: --prompts {args.prompts} must be >= 1 and --tolerance {args.tolerance} >= 0")
    task_args = parse_task_args(args.task_args)
    try:
        examples = generate(args.task, args.prompts, seed=1, **task_args)
    except ValueError as exc:  # an unknown task or task argument: the message lists the known ones
        raise ConfigError(f"dlm tune: {exc}") from None
    prompt, pad = encode_prompts(tok, [e["prompt"] for e in examples])
    prompt, pad = prompt.to(args.device), pad.to(args.device)
    answers = [e.get("response") or e.get("answer", "") for e in examples]
    gen_length = args.gen_length or max(len(tok(a, add_special_tokens=False).input_ids) for a in answers)
    tried, skipped = grid(args, gen_length, supported_caches(model))
    if not tried:
        reasons = "; ".join(sorted({s["why"] for s in skipped}))
        raise ConfigError(f"dlm tune: no valid setting in the grid ({reasons}); widen --block-lengths or --caches")
    block0 = next(s["block_length"] for s in tried)
    ref_settings = {"gen_length": gen_length, "steps": gen_length, "block_length": block0, "temperature": 0.0}
    reference = run_setting(model, tok, args.task, examples, prompt, pad, ref_settings, args.seed)
    results = []
    for settings in tqdm(tried, desc="dlm tune"):
        results.append(run_setting(model, tok, args.task, examples, prompt, pad, settings, args.seed))
    front = pareto([reference, *results])
    chosen = choose(results, reference, args.tolerance)
    aup = area_under_pareto(front)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tuned = {"task": args.task, "score": chosen.score, "tokens_per_forward": chosen.tpf, "nfe": chosen.nfe,
             "reference_score": reference.score, "tolerance": args.tolerance, "prompts": args.prompts,
             "seed": args.seed}  # fmt: skip
    write_preset(out / "preset.yaml", "confidence", chosen.settings, tuned)
    where = Path(str(path))
    name = where.parent.name if where.name == "final" else where.name
    title = f"dlm tune | {name} | {args.task} | {args.prompts} prompts, gen {gen_length} | AUP {aup:.1f}"
    plot(out / "pareto.png", [reference, *results], front, chosen, reference, title)
    record = {
        "checkpoint": str(path), "task": args.task, "task_args": task_args, "prompts": args.prompts,
        "gen_length": gen_length, "seed": args.seed, "tolerance": args.tolerance, "dtype": args.dtype,
        "device": args.device, "threads": torch.get_num_threads(),
        "versions": {"dlm": getattr(dlm, "__version__", None), "torch": torch.__version__},
        "reference": vars(reference), "results": [vars(r) for r in results], "skipped": skipped,
        "pareto": [vars(r) for r in front], "aup": aup, "chosen": vars(chosen),
    }  # fmt: skip
    write_json(out / "tune.json", record)
    print(f"{'setting':58s} {'score':>6s} {'NFE':>7s} {'TPF':>6s} {'tok/s':>9s}")
    for r in [reference, *results]:
        print(f"{describe(r.settings):58s} {r.score:6.3f} {r.nfe:7.1f} {r.tpf:6.1f} {r.tokens_per_s:9.1f}")
    for s in skipped:
        print(f"skipped: {describe(s)} ({s['why']})")
    print(
        f"reference (1 token/step, no cache): score {reference.score:.3f}; AUP {aup:.2f}\n"
        f"chosen (the fastest within {args.tolerance} of the reference's score): {describe(chosen.settings)} "
        f"— score {chosen.score:.3f}, TPF {chosen.tpf:.1f}, {chosen.tokens_per_s / reference.tokens_per_s:.1f}x "
        f"the reference's tokens/s\nwrote {out / 'preset.yaml'}, {out / 'pareto.png'}, {out / 'tune.json'}"
    )
    return 0


def describe(s: dict[str, Any]) -> str:
    rule = s.get("rule", "schedule")
    value = {"threshold": s.get("threshold"), "factor": s.get("factor")}.get(rule)
    open_at = s.get("open_next_at", 1.0)
    pipe = f" open_next_at {open_at} x{s.get('max_open_blocks')}" if open_at < 1 else ""
    return f"{rule}{'' if value is None else ' ' + str(value)} block {s['block_length']} {s.get('cache', 'none')}{pipe}"
