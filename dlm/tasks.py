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
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dlm.registry import Registry


@dataclass(frozen=True)
class Task:
    make: Callable[..., dict[str, str]]
    score: Callable[[dict[str, str], str], float]
    defaults: dict[str, Any]


TASKS: Registry[Task] = Registry("task")


def _repeat(index: int, rng: random.Random, period: int = 16, repeats: int = 16) -> dict[str, str]:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(period)]
    return {"prompt": " ".join(letters), "response": " ".join(letters * repeats)}


def _repeat_score(example: dict[str, str], completion: str) -> float:
    want = example["response"].split()
    got = completion.split()
    return sum(a == b for a, b in zip(want, got)) / len(want)


TASKS.register("repeat")(Task(_repeat, _repeat_score, {"period": 16, "repeats": 16}))


def generate(name: str, count: int, seed: int = 0, **args: Any) -> list[dict[str, str]]:
    """``count`` examples of task ``name``; unknown names and arguments raise with what exists."""
    try:
        task = TASKS.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    unknown = sorted(set(args) - set(task.defaults))
    if unknown:
        raise ValueError(
            f"task {name!r} has no argument(s) {', '.join(unknown)}; its arguments: {', '.join(task.defaults)}"
        )
    kwargs = {**task.defaults, **args}
    return [task.make(i, random.Random(f"{name}:{seed}:{i}"), **kwargs) for i in range(count)]


def score(name: str, example: dict[str, str], completion: str) -> float:
    return TASKS.get(name).score(example, completion)
