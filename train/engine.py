"""The engine a run trains on — DDP, FSDP2 or DeepSpeed ZeRO — chosen by the accelerate config alone.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m dlm.train RECIPE.yaml

dlm's loops are one code path over accelerate's engines: ``accelerator.prepare`` shards the model,
``save_state``/``load_state`` write and read sharded checkpoints, ``get_state_dict`` gathers the
full weights for export. What a sharded engine changes in the loops: every process takes part in
every forward (validation batches are evened out, samples are decoded on every process), and
checkpoints are accelerate states rather than HF model directories (``final/`` always is one).

On CPU ranks (``torchrun`` with gloo, the ``FSDP_*`` settings ``accelerate launch`` would export
in the environment) accelerate falls back to DDP whatever they say; torch's FSDP2 (``fully_shard``)
does run there, so when they ask for FSDP2 dlm turns accelerate's FSDP2 path on for CPU ranks too.
That is how the sharded code paths are tested without a GPU, and how a laptop can rehearse a
sharded recipe.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from dlm.config import ConfigError


def cpu_ranks() -> bool:
    """Several processes on a machine without CUDA: gloo CPU ranks."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(**kwargs) -> Accelerator:
    """The run's Accelerator (a fresh per-run state; the process group is kept across runs in one
    process). With an FSDP config on CPU ranks, accelerate's FSDP2 engine is switched on."""
    # A second main() in one process (notebooks, tests) may ask for other settings: drop the per-run
    # accelerator state, keep the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    on_cpu = cpu_ranks()
    accelerator = Accelerator(cpu=on_cpu or None, **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if on_cpu and wants_fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* settings accelerate launch exported
        if plugin.fsdp_version != 2:
            raise ConfigError(
                "FSDP on CPU ranks runs torch's FSDP2 only: set fsdp_version: 2 in the accelerate config "
                "(recipes/accelerate/fsdp2.yaml)"
            )
        if kwargs.get("mixed_precision", "no") != "no":
            plugin.set_mixed_precision(kwargs["mixed_precision"])
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    """The engine shards parameters (FSDP, DeepSpeed ZeRO): forwards and state dicts are collective."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def engine_name(accelerator: Accelerator) -> str:
    """A short name for logs and the run's identity: no, ddp, fsdp2, fsdp1 or deepspeed."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "no" if kind == DistributedType.NO else "ddp"


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 units of ``model`` (empty when it is not sharded with ``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: torch.nn.Module, accelerator: Accelerator):
    """Full parameters on every process for forwards whose number differs between processes
    (rollout decoding stops at EOS or a confidence threshold, per row): under FSDP2 the shards are
    all-gathered once on entry, forwards inside run locally, the shards come back on exit (each
    process holds one whole copy meanwhile). Other engines: nothing to do (DDP forwards are local)."""
    units = fsdp_modules(model)
    if not units:
        yield model
        return
    if torch.is_grad_enabled():
        raise RuntimeError("gathered() is for no-grad forwards; a backward would reduce-scatter per forward")
    after = accelerator.state.fsdp_plugin.reshard_after_forward
    for unit in units:
        unit.unshard()  # collective: every process enters with the same model
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(after, recurse=False)
            unit.reshard()


def shard_frozen(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A frozen model (an RL reference) sharded like the trained one under FSDP2; unchanged elsewhere."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return model
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, model)


def most_across(accelerator: Accelerator, n: int) -> int:
    """The largest ``n`` over the processes (so every one can run that many collective forwards)."""
    if accelerator.num_processes == 1:
        return n
    import torch.distributed as dist

    value = torch.tensor([n], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)
