"""Verifiable rewards: plain functions ``(prompts, completions, **fields) -> list[float]``.

Built-ins (``REWARDS``): ``repeat`` and ``arithmetic`` (dlm's generated tasks), ``answer_tags``
(the completion holds ``<answer>...</answer>``), ``boxed`` (a ``\\boxed{...}``), ``math_equiv``
(the boxed or tagged answer is mathematically equal to ``fields["answer"]``, via math-verify).
Every reasoning-gym dataset name (``countdown``, ``mini_sudoku``, ``basic_arithmetic``, ...) is a
reward too: its own scorer on the completion's ``<answer>`` (or whole completion) against the
example's ``entry`` (prompts from the same task carry it); ``reasoning_gym`` scores each entry
with the scorer of the dataset that made it (composite datasets). A user reward is
``module:function``. :func:`combine` builds a weighted sum; :func:`score` runs
one and checks what it returns.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

from dlm.registry import Registry, close_matches
from dlm.tasks import ANSWER_TAGS as TAGS
from dlm.tasks import extract_answer, is_reasoning_gym, reasoning_gym_names
from dlm.tasks import score as task_score

RewardFn = Callable[..., list[float]]
REWARDS: Registry[RewardFn] = Registry("reward")


class RewardError(ValueError):
    """A reward function is unknown, raised, or returned something unusable; the message names it."""


@REWARDS.register("repeat")
def repeat_reward(prompts, completions, response=None, **_):
    """Share of the copy task's answer letters in place (needs the ``response`` field)."""
    return [task_score("repeat", {"response": r}, c) for r, c in zip(response, completions)]


NUMBER = re.compile(r"-?\d+")


@REWARDS.register("arithmetic")
def arithmetic_reward(prompts, completions, answer=None, **_):
    """1 when the first number in the completion equals ``answer``."""
    out = []
    for a, c in zip(answer, completions):
        found = NUMBER.search(c)
        out.append(float(found is not None and found.group() == str(a).strip()))
    return out


@REWARDS.register("answer_tags")
def answer_tags_reward(prompts, completions, **_):
    return [float(TAGS.search(c) is not None) for c in completions]


def boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


@REWARDS.register("boxed")
def boxed_reward(prompts, completions, **_):
    return [float(boxed_content(c) is not None) for c in completions]


@REWARDS.register("math_equiv")
def math_equiv_reward(prompts, completions, answer=None, **_):
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise RewardError('reward "math_equiv" needs math-verify: pip install "dlm[rl]"') from exc
    out = []
    for a, c in zip(answer, completions):
        got = boxed_content(c) or extract_answer(c)
        out.append(float(bool(verify(parse(f"${a}$"), parse(f"${got}$")))))
    return out


def reasoning_gym_reward_for(name: str | None) -> RewardFn:
    """The reward of reasoning-gym dataset ``name``; ``None`` scores each entry with the scorer of
    the dataset that made it (``source_dataset``: composite datasets)."""
    label = name or "reasoning_gym"

    def reward(prompts, completions, entry=None, **_):
        if entry is None:
            raise RewardError(f'reward {label!r} needs the examples\' "entry" field: use a reasoning-gym rl.task')
        return [
            task_score(name or e["metadata"]["source_dataset"], {"entry": e}, c) for e, c in zip(entry, completions)
        ]

    reward.__name__ = f"reasoning_gym_{name}" if name else "reasoning_gym"
    return reward


REWARDS.register("reasoning_gym")(reasoning_gym_reward_for(None))


def resolve(name: str) -> RewardFn:
    """A reward by registry name or ``module:function``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise RewardError(f"reward {name!r}: cannot import {attr!r} from {module!r} ({exc})") from None
        if not callable(fn):
            raise RewardError(f"reward {name!r} is not callable")
        return fn
    if name in REWARDS:
        return REWARDS.get(name)
    if is_reasoning_gym(name):
        return reasoning_gym_reward_for(name)
    rg = reasoning_gym_names()
    more = (
        f", or any of the {len(rg)} reasoning-gym dataset names (countdown, mini_sudoku, basic_arithmetic, ...)"
        if rg
        else ' (reasoning-gym dataset names need pip install "dlm[rl]")'
    )
    raise RewardError(
        f"unknown reward {name!r}; known rewards: {', '.join(REWARDS.names())}{more}. "
        "Or give a user reward as module:function." + close_matches(name, REWARDS.names() + rg)
    )


def score(name: str, prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
    """Run reward ``name`` and check it returns one finite float per completion."""
    fn = resolve(name)
    try:
        values = fn(list(prompts), list(completions), **fields)
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward {name!r} must return a list of numbers; got {values!r:.80}") from exc
    if len(values) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise RewardError(f"reward {name!r} returned a non-finite value: {values}")
    return values


def combine(weights: dict[str, float], prompts, completions, **fields) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of several rewards; also returns each one's values (for logging)."""
    if not weights:
        raise RewardError("no rewards given; name at least one (e.g. rewards: {arithmetic: 1.0})")
    parts = {name: score(name, prompts, completions, **fields) for name in weights}
    total = [sum(weights[n] * parts[n][i] for n in weights) for i in range(len(completions))]
    return total, parts
