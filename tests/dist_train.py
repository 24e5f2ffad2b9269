"""Run by tests/test_train.py under torchrun: train a tiny recipe, save this rank's weights.

``DLM_TEST_DIE_AT_SAVE=N``: the last rank dies in the middle of writing checkpoint N (after the
engine wrote its shards, before the checkpoint is complete), as a killed process would.
``DLM_TEST_EXIT_AFTER_SAVE=N``: every rank exits once checkpoint N is complete (a run killed there).
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import dlm.model  # noqa: F401  (registers the Auto classes)
from conftest import exit_after_save
from dlm.config import load_recipe
from dlm.train import checkpoint, loop
from dlm.train.loop import main

if __name__ == "__main__":
    die_at = os.environ.get("DLM_TEST_DIE_AT_SAVE")
    if die_at is not None:
        real = checkpoint._save_sharded

        def save_then_die(accelerator, tmp, *args):
            real(accelerator, tmp, *args)
            if tmp.name.endswith(f"-{die_at}") and accelerator.process_index == accelerator.num_processes - 1:
                os._exit(17)

        checkpoint._save_sharded = save_then_die
    exit_after_save(loop)
    cfg = load_recipe(sys.argv[1], sys.argv[2:])
    result = main(cfg)
    rank = int(os.environ.get("RANK", "0"))  # the process group is closed when training ends
    state = result.model.state_dict()
    if not any(hasattr(v, "to_local") for v in state.values()):  # sharded runs are compared through final/
        state = {k: v.detach().contiguous() for k, v in state.items() if k != "lm_head.weight"}
        save_file(state, str(Path(cfg.train.output_dir) / f"rank{rank}.safetensors"))
