"""Run by tests/test_train.py under torchrun: train a tiny recipe, save this rank's weights."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import dlm  # noqa: F401
from dlm.config import load_recipe
from dlm.train.loop import main

if __name__ == "__main__":
    cfg = load_recipe(sys.argv[1], sys.argv[2:])
    result = main(cfg)
    rank = int(os.environ.get("RANK", "0"))  # the process group is closed when training ends
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(Path(cfg.train.output_dir) / f"rank{rank}.safetensors"))
