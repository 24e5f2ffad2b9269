"""Generated tasks: prompt/response pairs made on the spot, with a scorer.

Training and benchmarks need tasks that every machine has without a download and whose answers
can be checked exactly. A task is a function ``(index, rng, **args) -> {"prompt", "response"}``
(deterministic in ``(seed, index)``) and a scorer ``(example, completion) -> float in [0, 1]``.

    data:
      dataset: task:repeat          # SFT rows from the generated task
      format: chat
      task_args: {period: 16, repeats: 16}

* ``repeat`` — the prompt is ``period`` random letters; the response repeats them ``repeats``
  times. Every answer token is a copy from a fixed offset, so a small model learns it and becomes
  confident, which is what parallel decoding and cache approximations are tested against: the
  score is the share of answer letters reproduced at the right place.

Every `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ dataset is a task too, by
its own name (``countdown``, ``mini_sudoku``, ``basic_arithmetic``, ...; ``pip install
"dlm[rl]"``): ``task_args`` are the dataset's config fields, the example carries the question as
``prompt``, the reference ``answer`` (also the SFT ``response``) and the full reasoning-gym
``entry`` its scorer needs. The completion's answer is the content of its last
``<answer>...</answer>`` tag, or the whole completion (stripped) when it has none.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dlm.registry import Registry, close_matches


@dataclass(frozen=True)
class Task:
    make: Callable[..., dict[str, str]]
    score: Callable[[dict[str, str], str], float]
    defaults: dict[str, Any]


TASKS: Registry[Task] = Registry("task")
ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _repeat(index: int, rng: random.Random, period: int = 16, repeats: int = 16) -> dict[str, str]:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(period)]
    return {"prompt": " ".join(letters), "response": " ".join(letters * repeats)}


def _repeat_score(example: dict[str, str], completion: str) -> float:
    want = example["response"].split()
    got = completion.split()
    return sum(a == b for a, b in zip(want, got)) / len(want)


TASKS.register("repeat")(Task(_repeat, _repeat_score, {"period": 16, "repeats": 16}))


@functools.cache
def reasoning_gym_names() -> list[str]:
    """The reasoning-gym dataset names, or [] when reasoning-gym is not installed."""
    try:
        import reasoning_gym
    except ImportError:
        return []
    return sorted(reasoning_gym.factory.DATASETS)


def is_reasoning_gym(name: str) -> bool:
    return name not in TASKS and name in reasoning_gym_names()


def unknown_task(name: str) -> ValueError:
    rg = reasoning_gym_names()
    if rg:
        known = f"dlm's tasks: {', '.join(TASKS.names())}; or one of the {len(rg)} reasoning-gym datasets " + (
            "(e.g. countdown, mini_sudoku, basic_arithmetic; all: reasoning_gym.factory.DATASETS)."
        )
    else:
        known = f'dlm\'s tasks: {", ".join(TASKS.names())} (reasoning-gym datasets need pip install "dlm[rl]").'
    return ValueError(f"unknown task {name!r}; {known}" + close_matches(name, TASKS.names() + rg))


def generate(name: str, count: int, seed: int = 0, **args: Any) -> list[dict[str, Any]]:
    """``count`` examples of task ``name``; unknown names and arguments raise with what exists.

    Example ``i`` depends only on ``(name, seed, i, args)``: a longer draw extends a shorter one.
    """
    if is_reasoning_gym(name):
        return _reasoning_gym_examples(name, count, seed, args)
    if name not in TASKS:
        raise unknown_task(name)
    task = TASKS.get(name)
    unknown = sorted(set(args) - set(task.defaults))
    if unknown:
        raise ValueError(
            f"task {name!r} has no argument(s) {', '.join(unknown)}; its arguments: {', '.join(task.defaults)}"
        )
    kwargs = {**task.defaults, **args}
    return [task.make(i, random.Random(f"{name}:{seed}:{i}"), **kwargs) for i in range(count)]


def _reasoning_gym_examples(name: str, count: int, seed: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    import reasoning_gym

    config_cls = reasoning_gym.factory.DATASETS[name][1]
    fields = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(
            f"reasoning-gym task {name!r} has no argument(s) {', '.join(unknown)}; its arguments: {', '.join(fields)}"
        )
    try:
        ds = reasoning_gym.create_dataset(name, size=max(count, 1), seed=seed, **args)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ValueError(f"reasoning-gym task {name!r} with {args}: {exc}") from None
    return [
        {"prompt": e["question"], "response": str(e["answer"]), "answer": str(e["answer"]), "entry": e}
        for e in (ds[i] for i in range(count))
    ]


def extract_answer(completion: str) -> str:
    """The content of the completion's last ``<answer>...</answer>``, else the whole completion."""
    found = ANSWER_TAGS.findall(completion)
    return (found[-1] if found else completion).strip()


def score(name: str, example: dict[str, Any], completion: str) -> float:
    """``name``'s score of ``completion`` in [0, 1]."""
    if is_reasoning_gym(name):
        import reasoning_gym

        return float(reasoning_gym.get_score_answer_fn(name)(extract_answer(completion), example["entry"]))
    if name not in TASKS:
        raise unknown_task(name)
    return TASKS.get(name).score(example, completion)
