"""Guided-decoding benchmark: reward against compute for best-of-N, SMC, SVDD and DTS on a task.

    dlm bench guide --checkpoint runs/rl-sft --task repeat --task-args period=8,repeats=4 \\
        --reward repeat --budgets 1,2,4,8 --seeds 0,1,2 --reference runs/rl-quickstart \\
        --json guide.json --plot guide.png

Every method decodes the same held-out task prompts with the same decoder; its budget is its
size knob (best-of-N and SMC: particles; SVDD: candidates per step; DTS: rollouts, run in rounds
of a quarter of them so later rounds select on the values of earlier ones). Each point is
the mean reward of the returned samples and the mean model evaluations per prompt (every
particle's decoder calls, value estimates and energies), over prompts, then over seeds (± the
standard deviation across seeds). Best-of-N at equal NFE (interpolated in log NFE between its own
points) is the baseline each point is compared with. ``--reference`` adds another checkpoint
decoded plainly (e.g. the RL-trained model), one sample per prompt.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path

import torch

from dlm.eval.bench_decode import parse_task_args
from dlm.utils import pyplot, save_figure, torch_dtype, write_json

BUDGET_KEY = {"best_of_n": "particles", "smc": "particles", "svdd": "candidates", "dts": "rollouts"}


def baseline_at(points: list[tuple[float, float]], nfe: float) -> float | None:
    """Best-of-N's reward interpolated at ``nfe`` (linear in log NFE); None outside its range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= nfe <= x1:
            w = 0.0 if x1 == x0 else (math.log(nfe) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    if points and math.isclose(nfe, points[0][0]):
        return points[0][1]
    return None


def run_method(method, budget, decoder, model, ids, pad, reward, seed, extra: dict) -> dict:
    from dlm.decode.guides import build_guide

    settings = {BUDGET_KEY[method]: budget, **extra.get(method, {})}
    if method == "dts":  # rounds of a quarter of the rollouts: later rounds select on earlier values
        settings.setdefault("parallel", max(1, budget // 4))
    guide = build_guide(method, **settings)
    start = time.perf_counter()
    out = guide(decoder, model, ids, reward=reward, attention_mask=pad, generator=torch.Generator().manual_seed(seed))
    wall = time.perf_counter() - start
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "reward": float(out.reward.mean()),
        "nfe": float(out.nfe.double().mean()),
        "decode_nfe": float(out.decode_nfe.double().mean()),
        "value_nfe": float(out.value_nfe.double().mean()),
        "wall_s": wall,
    }


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        rewards = [r["reward"] for r in rs]
        out.append(
            {
                "method": method,
                "budget": budget,
                "seeds": len(rs),
                "reward": statistics.mean(rewards),
                "reward_std": statistics.stdev(rewards) if len(rs) > 1 else 0.0,
                "nfe": statistics.mean(r["nfe"] for r in rs),
                "wall_s": statistics.mean(r["wall_s"] for r in rs),
            }
        )
    bon = [(a["nfe"], a["reward"]) for a in out if a["method"] == "best_of_n"]
    for a in out:
        a["best_of_n_at_equal_nfe"] = baseline_at(bon, a["nfe"])
    return out


def plot(summary: list[dict], reference: dict | None, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in BUDGET_KEY:
        pts = sorted((a for a in summary if a["method"] == method), key=lambda a: a["nfe"])
        if not pts:
            continue
        ax.errorbar(
            [a["nfe"] for a in pts],
            [a["reward"] for a in pts],
            yerr=[a["reward_std"] for a in pts],
            marker="o",
            capsize=3,
            label=method + (" (baseline)" if method == "best_of_n" else ""),
        )
    if reference is not None:
        ax.plot([reference["nfe"]], [reference["reward"]], "k*", markersize=12, label=reference["label"])
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations per prompt (NFE)")
    ax.set_ylabel("mean reward")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def main(args) -> int:
    """Reward against NFE of each method x budget x seed on a task's held-out prompts."""
    from tqdm.auto import tqdm

    from dlm.loading import load

    methods, budgets, seeds = _grid(args)
    model, tok, where = load(args.checkpoint, dtype=torch_dtype(args.dtype), device=args.device)
    model.eval()
    ids, pad, reward = _prompts_and_reward(args, tok)
    decoder, settings = _decoder(args)
    extra = {"smc": {"alpha": args.alpha}, "svdd": {"alpha": args.svdd_alpha}, "dts": {"alpha": args.alpha}}
    if args.dts_mode:
        extra["dts"]["mode"] = args.dts_mode
    grid = [(m, b, s) for m in methods for b in budgets for s in seeds]
    with torch.no_grad():
        rows = [
            run_method(method, budget, decoder, model, ids, pad, reward, seed, extra)
            for method, budget, seed in tqdm(grid, desc="bench guide", dynamic_ncols=True)
        ]
        reference = _reference(args, decoder, ids, pad, reward, seeds) if args.reference else None
    summary = aggregate(rows)
    _print_summary(args, where, methods, summary, reference)
    record = {
        "checkpoint": str(where), "task": args.task, "task_args": parse_task_args(args.task_args),
        "reward": args.reward or args.task, "prompts": args.prompts, "decoder": {"name": args.decoder, **settings},
        "alpha": args.alpha, "svdd_alpha": args.svdd_alpha, "seeds": seeds, "rows": rows, "summary": summary,
        "reference": reference, "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
    }  # fmt: skip
    if args.json:
        write_json(args.json, record)
    if args.plot:
        plot(summary, reference, Path(args.plot), f"{args.task} · {Path(str(where)).parent.name} · {args.decoder}")
        print(f"plot: {args.plot}")
    return 0


def _grid(args) -> tuple[list[str], list[int], list[int]]:
    """Methods (best-of-N first: the baseline every point is read against), budgets and seeds."""
    from dlm.config import ConfigError

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in BUDGET_KEY]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(BUDGET_KEY)}")
    if "best_of_n" not in methods:
        methods = ["best_of_n", *methods]
    return methods, [int(b) for b in args.budgets.split(",")], [int(s) for s in args.seeds.split(",")]


def _prompts_and_reward(args, tok):
    """The task's held-out prompts (left-padded ids and mask) and the reward scoring them."""
    from dlm.config import ConfigError
    from dlm.data import encode_prompts
    from dlm.decode.guides.base import as_reward
    from dlm.tasks import generate

    try:
        examples = generate(args.task, args.prompts, seed=987_654, **parse_task_args(args.task_args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    prompts = [e["prompt"] for e in examples]
    fields = {k: [e[k] for e in examples] for k in examples[0] if k != "prompt"}
    ids, pad = (t.to(args.device) for t in encode_prompts(tok, prompts))
    return ids, pad, as_reward(args.reward or args.task, tok, prompts, fields)


def _decoder(args):
    from dlm.decode import build_decoder

    settings = {"gen_length": args.gen_length, "block_length": args.block_length, "temperature": args.temperature}
    if args.decoder != "first_hitting":
        settings["steps"] = args.steps or args.gen_length
    return build_decoder(args.decoder, **settings), settings


def _reference(args, decoder, ids, pad, reward, seeds: list[int]) -> dict:
    """Plain decoding of ``--reference`` (e.g. the RL-trained model) on the same prompts."""
    from dlm.loading import load

    ref_model, _, ref_where = load(args.reference, dtype=torch_dtype(args.dtype), device=args.device)
    ref_rows = [run_method("best_of_n", 1, decoder, ref_model.eval(), ids, pad, reward, s, {}) for s in seeds]
    return {
        "checkpoint": str(ref_where),
        "label": f"{Path(str(ref_where)).parent.name or ref_where} (plain decoding)",
        "reward": statistics.mean(r["reward"] for r in ref_rows),
        "nfe": statistics.mean(r["nfe"] for r in ref_rows),
        "rows": ref_rows,
    }


def _print_summary(args, where, methods: list[str], summary: list[dict], reference: dict | None) -> None:
    print(f"dlm bench guide | {where} | task {args.task} ({args.prompts} prompts) | reward {args.reward or args.task}")
    print(f"{'method':<10} {'budget':>6} {'NFE/prompt':>11} {'reward':>16} {'best-of-N @NFE':>15} {'wall s':>7}")
    for a in sorted(summary, key=lambda a: (methods.index(a["method"]), a["budget"])):
        base = a["best_of_n_at_equal_nfe"]
        print(
            f"{a['method']:<10} {a['budget']:>6} {a['nfe']:>11.1f} {a['reward']:>9.4f} ± {a['reward_std']:<5.3f}"
            f" {('—' if base is None else f'{base:.4f}'):>15} {a['wall_s']:>7.2f}"
        )
    if reference is not None:
        print(f"reference {reference['checkpoint']}: reward {reference['reward']:.4f} at NFE {reference['nfe']:.1f}")
