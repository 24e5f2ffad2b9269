"""Noise schedules for absorbing (masking) diffusion (docs/objectives.md#noise-schedules).

``alpha(t)`` is the probability that a token is still clean at time ``t`` (``α_0 = 1``); the
continuous-time NELBO weights each masked token's loss by ``w(t) = -α'_t / (1 - α_t)``.
The NELBO is the same for every schedule in expectation; only its variance changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from dlm.config import ConfigError
from dlm.registry import Registry, close_matches


class Schedule(Protocol):
    def alpha(self, t: Tensor) -> Tensor: ...
    def weight(self, t: Tensor) -> Tensor: ...
    def alpha_inverse(self, a: Tensor) -> Tensor: ...


SCHEDULES: Registry[type] = Registry("schedule")


@SCHEDULES.register("loglinear")
@dataclass(frozen=True)
class LogLinear:
    """``α_t = 1 - (1-ε) t`` (MDLM; ε = 0 is LLaDA's linear schedule); ``w(t) = 1/t``."""

    eps: float = 1e-3

    def __post_init__(self):
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"loglinear schedule: eps={self.eps} must lie in [0, 1)")

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def weight(self, t: Tensor) -> Tensor:
        return 1 / t

    def alpha_inverse(self, a: Tensor) -> Tensor:
        return ((1 - a) / (1 - self.eps)).clamp(0, 1)


@SCHEDULES.register("cosine")
@dataclass(frozen=True)
class Cosine:
    """``α_t = ε + (1-ε) cos(πt/2)``; ``w(t) = (π/2) sin(πt/2) / (1 - cos(πt/2))``."""

    eps: float = 1e-3

    def __post_init__(self):
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"cosine schedule: eps={self.eps} must lie in [0, 1)")

    def alpha(self, t: Tensor) -> Tensor:
        return self.eps + (1 - self.eps) * torch.cos(math.pi * t / 2)

    def weight(self, t: Tensor) -> Tensor:
        return (math.pi / 2) * torch.sin(math.pi * t / 2) / (1 - torch.cos(math.pi * t / 2))

    def alpha_inverse(self, a: Tensor) -> Tensor:
        return (2 / math.pi) * torch.arccos(((a - self.eps) / (1 - self.eps)).clamp(0, 1))


@SCHEDULES.register("polynomial")
@dataclass(frozen=True)
class Polynomial:
    """``α_t = 1 - t^k`` (MD4); ``w(t) = k / t``."""

    k: float = 2.0

    def __post_init__(self):
        if self.k <= 0:
            raise ConfigError(f"polynomial schedule: k={self.k} must be positive")

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t**self.k

    def weight(self, t: Tensor) -> Tensor:
        return self.k / t

    def alpha_inverse(self, a: Tensor) -> Tensor:
        return (1 - a).clamp(0, 1) ** (1 / self.k)


def build_schedule(name: str, **kwargs: Any) -> Schedule:
    try:
        cls = SCHEDULES.get(name)
    except KeyError as exc:
        raise ConfigError(f"diffusion.schedule: {exc.args[0]}") from None
    allowed = [f.name for f in fields(cls)]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(
                f"diffusion.schedule_args: {name} schedule has no parameter {key!r}; "
                f"its parameters: {', '.join(allowed) or '(none)'}." + close_matches(key, allowed)
            )
    return cls(**kwargs)


def sample_times(n: int, generator: torch.Generator | None, t_eps: float, antithetic: bool) -> Tensor:
    """Diffusion times in ``[t_eps, 1]`` for a batch of ``n``.

    Antithetic (low-discrepancy, MDLM): ``t_i = (u + i/n) mod 1`` — one time per stratum
    ``[i/n, (i+1)/n)`` — then mapped affinely into ``[t_eps, 1]``.
    """
    if antithetic:
        u = torch.rand(1, generator=generator)
        t = (u + torch.arange(n) / n) % 1.0
    else:
        t = torch.rand(n, generator=generator)
    return t_eps + (1 - t_eps) * t
