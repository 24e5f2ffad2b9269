"""Local, offline lm-eval tasks (no download): data generated here, YAMLs that point at it.

    from dlm.eval.tasks import materialize
    include_path = materialize("~/.cache/dlm/lm_eval_tasks")   # lm_eval --include_path ...

lm-eval reads ``data_files`` relative to the working directory, so the YAMLs are written with
absolute paths next to their data. Tasks:

* ``dlm_repeat`` (generate_until): the copy task of :mod:`dlm.tasks` in the format
  ``recipes/repeat-task.yaml`` trains on (16 letters, answer repeated 16 times = 256 tokens);
  exact match and the share of letters in place.
* ``dlm_repeat_mc`` (multiple_choice → loglikelihood): pick the true continuation of a pattern
  among four.
* ``dlm_arithmetic`` (generate_until): small additions ``a + b =``; exact match of the number.
* ``dlm_stdlib_ppl`` (loglikelihood_rolling): word / byte perplexity bounds and bits per byte
  on held-out Python standard-library files.
"""

from __future__ import annotations

import random
import shutil
import string
from pathlib import Path

import yaml

from dlm.data import stdlib_files
from dlm.tasks import generate
from dlm.utils import write_atomic

COUNT = 200
FEWSHOT = 16  # few-shot examples per task, drawn apart from the held-out ones
FEWSHOT_SEED = 1000
METRIC = {"aggregation": "mean", "higher_is_better": True}
SCORERS = Path(__file__).with_name("dlm_task_utils.py")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _unseen(shots: list[dict], held_out: list[dict], key: str) -> list[dict]:
    """Few-shot examples none of which is a held-out question (lm-eval would otherwise show a question,
    answered, in its own prompt)."""
    seen = {row[key] for row in held_out}
    return [row for row in shots if row[key] not in seen]


def _repeat_choices(count: int, seed: int, rng: random.Random) -> list[dict]:
    """Multiple-choice copy examples: the prompt's letters among three random strings."""
    out = []
    for ex in generate("repeat", count, seed=seed, period=8, repeats=1):
        letters = ex["prompt"].split()
        wrong = [" ".join(rng.choice(string.ascii_lowercase) for _ in letters) for _ in range(3)]
        label = rng.randrange(4)
        choices = wrong[:label] + [" ".join(letters)] + wrong[label:]
        out.append({"prompt": ex["prompt"], "choices": [" " + c for c in choices], "label": label})
    return out


def _sums(count: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append({"question": f"{a} + {b} =", "answer": str(a + b)})
    return out


def _stdlib_texts(seed: int) -> list[dict]:
    files = stdlib_files("**/*.py")
    picked = random.Random(f"ppl:{seed}").sample(files, min(24, len(files)))
    texts = (Path(f).read_text(encoding="utf-8", errors="replace")[:4000] for f in picked)
    return [{"text": t} for t in texts if t.strip()]


def _task_specs(count: int, seed: int, period: int, repeats: int) -> dict[str, tuple[list, list | None, dict]]:
    """Each task: its held-out rows, its few-shot rows (or None) and the fields of its YAML."""
    repeat = generate("repeat", count, seed=seed, period=period, repeats=repeats)
    repeat_shots = generate("repeat", FEWSHOT, seed=seed + FEWSHOT_SEED, period=period, repeats=repeats)
    mc = _repeat_choices(count, seed + 1, random.Random(f"repeat_mc:{seed}"))
    mc_shots = _repeat_choices(FEWSHOT, seed + 1 + FEWSHOT_SEED, random.Random(f"repeat_mc_fewshot:{seed}"))
    arith = _sums(count, random.Random(f"arithmetic:{seed}"))
    arith_shots = _sums(FEWSHOT * 2, random.Random(f"arithmetic_fewshot:{seed}"))
    return {
        "repeat": (repeat, _unseen(repeat_shots, repeat, "prompt"), {
            "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{response}}",
            "generation_kwargs": {"until": [], "max_gen_toks": period * repeats, "do_sample": False},
            "process_results": "dlm_task_utils.repeat_results",
            "metric_list": [{"metric": "exact_match", **METRIC}, {"metric": "letter_accuracy", **METRIC}],
        }),
        "repeat_mc": (mc, _unseen(mc_shots, mc, "prompt"), {
            "output_type": "multiple_choice", "doc_to_text": "{{prompt}} .", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc", **METRIC}],
        }),
        "arithmetic": (arith, _unseen(arith_shots, arith, "question")[:FEWSHOT], {
            "output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n", " ="], "max_gen_toks": 8, "do_sample": False},
            "filter_list": [{"name": "number", "filter": [
                {"function": "regex", "regex_pattern": "(-?[0-9]+)"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", **METRIC}],
        }),
        "stdlib_ppl": (_stdlib_texts(seed), None, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        }),
    }  # fmt: skip


def task_yaml(name: str, files: dict[str, Path], fields: dict) -> str:
    """An lm-eval task YAML reading local JSONL ``files`` (split -> path, absolute: lm-eval reads
    ``data_files`` relative to its working directory). ``process_results`` names a function of
    ``dlm_task_utils`` (YAML's ``!function`` tag, which a plain dump cannot write)."""
    fields = dict(fields)
    scorer = fields.pop("process_results", None)
    task = {
        "task": f"dlm_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
        "test_split": "test",
        **({"fewshot_split": "fewshot"} if "fewshot" in files else {}),
        **fields,
        "metadata": {"version": 1.0},
    }
    text = yaml.safe_dump(task, sort_keys=False, width=1000)
    return text + (f"process_results: !function {scorer}\n" if scorer else "")


def materialize(
    root: str | Path, count: int = COUNT, seed: int = 1, repeat_period: int = 16, repeat_count: int = 16
) -> Path:
    """Write the task data and YAMLs under ``root``; return the include path for lm-eval.

    Held-out examples use ``seed=1``; ``recipes/repeat-task.yaml`` trains on ``seed=0``."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SCORERS, root / SCORERS.name)
    for name, (rows, shots, fields) in _task_specs(count, seed, repeat_period, repeat_count).items():
        files = {"test": root / f"{name}.jsonl"}
        _write_jsonl(files["test"], rows)
        if shots is not None:
            files["fewshot"] = root / f"{name}_fewshot.jsonl"
            _write_jsonl(files["fewshot"], shots)
        write_atomic(root / f"dlm_{name}.yaml", task_yaml(name, files, fields))
    return root
