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

import json
import random
import string
from pathlib import Path

from dlm.data import stdlib_files
from dlm.tasks import generate

COUNT = 200

UTILS = '''"""Scorers for dlm's local lm-eval tasks (written by dlm.eval.tasks.materialize)."""

from dlm.tasks import score


def repeat_results(doc, results):
    completion = results[0]
    return {
        "exact_match": float(completion.split() == doc["response"].split()),
        "letter_accuracy": score("repeat", doc, completion),
    }
'''


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _yaml(path: Path, text: str) -> None:
    path.write_text(text.strip() + "\n")


FEWSHOT = 16  # few-shot examples per task, drawn apart from the held-out ones
FEWSHOT_SEED = 1000


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


def materialize(
    root: str | Path, count: int = COUNT, seed: int = 1, repeat_period: int = 16, repeat_count: int = 16
) -> Path:
    """Write the task data and YAMLs under ``root``; return the include path for lm-eval.

    Held-out examples use ``seed=1``; ``recipes/repeat-task.yaml`` trains on ``seed=0``."""
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)

    rows = generate("repeat", count, seed=seed, period=repeat_period, repeats=repeat_count)
    _write_jsonl(root / "repeat.jsonl", rows)
    shots = generate("repeat", FEWSHOT, seed=seed + FEWSHOT_SEED, period=repeat_period, repeats=repeat_count)
    _write_jsonl(root / "repeat_fewshot.jsonl", _unseen(shots, rows, "prompt"))
    (root / "dlm_task_utils.py").write_text(UTILS)
    _yaml(
        root / "dlm_repeat.yaml",
        f"""
task: dlm_repeat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "repeat.jsonl"}
    fewshot: {root / "repeat_fewshot.jsonl"}
test_split: test
fewshot_split: fewshot
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{response}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {repeat_period * repeat_count}
  do_sample: false
process_results: !function dlm_task_utils.repeat_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: letter_accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    )

    mc = _repeat_choices(count, seed + 1, random.Random(f"repeat_mc:{seed}"))
    _write_jsonl(root / "repeat_mc.jsonl", mc)
    shots = _repeat_choices(FEWSHOT, seed + 1 + FEWSHOT_SEED, random.Random(f"repeat_mc_fewshot:{seed}"))
    _write_jsonl(root / "repeat_mc_fewshot.jsonl", _unseen(shots, mc, "prompt"))
    _yaml(
        root / "dlm_repeat_mc.yaml",
        f"""
task: dlm_repeat_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "repeat_mc.jsonl"}
    fewshot: {root / "repeat_mc_fewshot.jsonl"}
test_split: test
fewshot_split: fewshot
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}} ."
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    )

    arith = _sums(count, random.Random(f"arithmetic:{seed}"))
    _write_jsonl(root / "arithmetic.jsonl", arith)
    shots = _sums(FEWSHOT * 2, random.Random(f"arithmetic_fewshot:{seed}"))
    _write_jsonl(root / "arithmetic_fewshot.jsonl", _unseen(shots, arith, "question")[:FEWSHOT])
    _yaml(
        root / "dlm_arithmetic.yaml",
        f"""
task: dlm_arithmetic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "arithmetic.jsonl"}
    fewshot: {root / "arithmetic_fewshot.jsonl"}
test_split: test
fewshot_split: fewshot
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", " ="]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    )

    files = stdlib_files("**/*.py")
    picked = random.Random(f"ppl:{seed}").sample(files, min(24, len(files)))
    texts = []
    for f in picked:
        text = Path(f).read_text(encoding="utf-8", errors="replace")[:4000]
        if text.strip():
            texts.append({"text": text})
    _write_jsonl(root / "stdlib_ppl.jsonl", texts)
    _yaml(
        root / "dlm_stdlib_ppl.yaml",
        f"""
task: dlm_stdlib_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "stdlib_ppl.jsonl"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
    )
    return root

