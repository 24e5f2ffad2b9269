"""Exponential moving average of the weights (MDLM uses decay 0.9999 for pretraining).

The shadow is fp32 and lives beside each parameter: on its device, and under FSDP2 beside the local
shard of a sharded parameter (a DTensor), so every process keeps the EMA of the weights it holds
and nothing is gathered. A model moved after the EMA was built (``accelerator.prepare``,
``.to(device)``) takes its shadow with it at the next update.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def local(param: Tensor) -> Tensor:
    """The part of a parameter this process holds: a DTensor's local shard, else the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def reshard(model: nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state (a root module keeps its parameters gathered
    after a forward), so ``named_parameters()`` are the local shards the shadow mirrors."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            n: local(p).detach().float().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        reshard(model)
        for name, param in model.named_parameters():
            if name in self.shadow:
                value = local(param).detach()
                shadow = self.shadow[name]
                if shadow.device != value.device:  # the model moved since the EMA was built
                    shadow = self.shadow[name] = shadow.to(value.device)
                shadow.lerp_(value.float(), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``model`` (for validation and export)."""
        backup = {}
        reshard(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.shadow:
                    target = local(param)
                    backup[name] = target.detach().clone()
                    target.copy_(self.shadow[name])
        try:
            yield
        finally:
            reshard(model)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in backup:
                        local(param).copy_(backup[name])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
