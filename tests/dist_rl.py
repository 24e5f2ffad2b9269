"""Run by test_rl_loop under torchrun (two ranks) and plainly (one process): a few RL steps with
the same global batch; rank 0 writes the final weights and the log."""

import json
import sys

from safetensors.torch import save_file

from dlm.config import from_dict
from dlm.train.rl.loop import RLRecipe, main

sft, out, per_rank, estimator = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = from_dict(
    RLRecipe,
    {
        "seed": 5,
        "rl": {
            "init": sft,
            "task_args": {"period": 4, "repeats": 2},
            "prompts_per_step": per_rank,
            "group_size": 3,
            "eval_every": 2,
            "eval_prompts": 4,
            "drop_zero_variance": False,
            "estimator": estimator,
            "inner_updates": 2,
        },
        "decode": {"decoder": "confidence", "gen_length": 8, "steps": 8, "block_length": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"output_dir": out, "max_steps": 2, "save_every": 10, "plot": False},
    },
)
result = main(cfg)
if result["final"] is not None:
    save_file({k: v.detach().clone() for k, v in result["model"].state_dict().items()}, f"{out}/weights.safetensors")
    with open(f"{out}/history.json", "w") as fh:
        json.dump(result["history"], fh)
