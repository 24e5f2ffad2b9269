"""``dlm eval CHECKPOINT --tasks ...``: lm-eval-harness on a dlm model, with decoding throughput.

dlm's offline tasks (:mod:`dlm.eval.tasks`) are always available; ``--include-path`` adds
directories of your own task YAMLs; stock hub tasks (gsm8k, hellaswag, ...) work where the
network is. Scores, the throughput of ``generate_until`` (generated tokens / decoding time)
and the settings go to the terminal and, with ``--output``, to a JSON file.
"""

from __future__ import annotations

import time
from pathlib import Path

from dlm.utils import write_json

MODEL_OPTIONS = (  # CLI option -> model_args key (None values are left out)
    "decoder",
    "gen_length",
    "steps",
    "block_length",
    "cache",
    "threshold",
    "factor",
    "temperature",
    "refresh_every",
    "open_next_at",
    "preset",
    "max_open_blocks",
    "compile",
    "mc_num",
    "batch_size",
    "device",
    "dtype",
    "seed",
)


def task_dir() -> Path:
    from dlm.loading import dlm_cache

    return dlm_cache() / "lm_eval_tasks"


def check_tasks(tasks: list[str], manager) -> None:
    """Every task is one lm-eval knows (a name, a glob over names, or a YAML path); an unknown one
    lists dlm's offline tasks and suggests the closest name."""
    from dlm.config import ConfigError
    from dlm.registry import close_matches

    for task in tasks:
        if manager.match_tasks([task]) or Path(task).is_file():
            continue
        local = sorted(t for t in manager.all_tasks if t.startswith("dlm_"))
        raise ConfigError(
            f"unknown task {task!r}. dlm's offline tasks: {', '.join(local)}; lm-eval knows "
            f"{len(manager.all_tasks)} more (lm-eval ls tasks)." + close_matches(task, manager.all_tasks)
        )


def summary(lm, throughput: dict) -> str:
    """The closing line: decoding throughput and settings when the tasks generated, the
    likelihood estimator when they only scored."""
    head = f"dlm eval | wall {throughput['wall_seconds']:.1f} s"
    if not lm.generated_tokens:
        return f"{head} | likelihood only: {lm.estimator} estimator, mc_num {lm.mc_num}"
    rate = throughput["generated_tokens_per_s"]
    settings = " ".join(f"{k}={v}" for k, v in sorted(lm.decoder_settings.items())) or "its defaults"
    return (
        f"{head} | {lm.generated_tokens} generated tokens in {lm.generation_seconds:.1f} s of decoding"
        + (f" ({rate:.1f} tokens/s)" if rate else "")
        + f" | decoder {lm.decoder}, {settings}"
    )


def main(args) -> int:
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from dlm.cli import confidence_rule
    from dlm.config import ConfigError
    from dlm.eval.harness import DLMEvalModel
    from dlm.eval.tasks import materialize

    datasets.disable_progress_bars()  # lm-eval's task loading; dlm's own bars stay
    include = [str(materialize(task_dir()))] + [str(Path(p).expanduser().resolve()) for p in args.include_path or []]
    manager = TaskManager(include_path=include)
    tasks = [t for t in args.tasks.split(",") if t]
    check_tasks(tasks, manager)
    kwargs = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k, None) is not None}
    kwargs.update(confidence_rule(args))
    try:
        lm = DLMEvalModel(pretrained=args.checkpoint, **kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    t0 = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        log_samples=args.log_samples,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
    )
    wall = time.perf_counter() - t0
    if out is None:  # a non-zero rank under several processes
        return 0
    throughput = {
        "generated_tokens": lm.generated_tokens,
        "generation_seconds": lm.generation_seconds,
        "generated_tokens_per_s": lm.generated_tokens / lm.generation_seconds if lm.generation_seconds else None,
        "wall_seconds": wall,
    }
    print(make_table(out))
    print(summary(lm, throughput))
    if args.output:
        path = Path(args.output).expanduser()
        record = {
            "results": out["results"],
            "versions": out.get("versions"),
            "n-shot": out.get("n-shot"),
            "config": {"checkpoint": args.checkpoint, "model_args": kwargs, "tasks": tasks, "limit": args.limit},
            "throughput": throughput,
        }
        if args.log_samples:
            record["samples"] = out.get("samples")
        write_json(path, record)
        print(f"wrote {path}")
    return 0
