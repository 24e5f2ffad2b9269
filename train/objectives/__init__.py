"""Training objectives behind one interface, chosen by name (``objective: mdlm``).

An objective is built from the recipe and exposes:

* ``sample_noise(shape, generator) -> dict[str, Tensor]`` — all randomness for a *global*
  batch of shape ``[G, L]`` (leading dim ``G``). The training loop draws it identically on
  every rank from a per-step seed and slices out the rows each rank owns, so a run on N
  processes sees exactly the noise a single process would with the same global batch, and a
  resumed run sees exactly the noise of an uninterrupted one.
  ``for_eval=True`` asks for the noise of the reported bound (BD3-LM trains on clipped mask
  rates but reports the unclipped NELBO).
* ``attention`` (optional): ``(mode, block_size)`` the trained model decodes with; default
  bidirectional.
* ``loss(model, batch, noise) -> LossOutput`` — ``total`` (summed loss) and ``count`` (its
  normaliser); the loop optimises ``total / count`` and validation reports
  ``exp(Σ total / Σ count)`` — for diffusion objectives the NELBO perplexity bound.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dlm.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from dlm.train.objectives.common import LossOutput


class Objective(Protocol):
    name: str
    #: "nelbo" (a perplexity upper bound) or "nll" (exact, AR)
    bound: str

    def sample_noise(
        self, shape: tuple[int, int], generator: torch.Generator, for_eval: bool = False
    ) -> dict[str, Tensor]: ...
    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor], noise: dict[str, Tensor]) -> LossOutput: ...


OBJECTIVES: Registry[Callable[..., Objective]] = Registry(
    "objective",
    builtins={name: f"dlm.train.objectives.{name}" for name in ("ar", "bd3lm", "exact_count", "mdlm", "sft")},
)


def build_objective(name: str, **kwargs: Any) -> Objective:
    from dlm.config import ConfigError

    try:
        factory = OBJECTIVES.get(name)
    except KeyError as exc:
        raise ConfigError(f"objective: {exc.args[0]}") from None
    return factory(**kwargs)


_COMMON = {  # importable from here as before; they live where they need torch
    "LossOutput": "dlm.train.objectives.common",
    "subs_log_probs": "dlm.train.objectives.common",
    "paired_logits_from": "dlm.train.objectives.common",
    "is_shifted": "dlm.model.modeling",
    "logits_of": "dlm.model.modeling",
    "next_token_logits": "dlm.model.modeling",
}


def __getattr__(name: str):
    if name in _COMMON:
        return getattr(importlib.import_module(_COMMON[name]), name)
    raise AttributeError(f"module 'dlm.train.objectives' has no attribute {name!r}")
