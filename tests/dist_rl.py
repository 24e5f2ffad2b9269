"""Run by test_rl_loop / test_sharded under torchrun (two ranks, DDP or FSDP2) and plainly (one
process): a few RL steps with the same global batch; rank 0 writes the final weights and the log.
An optional fifth argument (JSON) is merged into the recipe's sections.
``DLM_TEST_EXIT_AFTER_SAVE=N``: every rank exits once checkpoint N is complete (a run killed there)."""

import json
import shutil
import sys

from conftest import exit_after_save
from dlm.config import from_dict
from dlm.train.rl import loop
from dlm.train.rl.loop import RLRecipe, main

exit_after_save(loop)

sft, out, per_rank, estimator = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
recipe = {
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
}
for section, values in extra.items():
    recipe[section] = {**recipe.get(section, {}), **values}
result = main(from_dict(RLRecipe, recipe))
if result["final"] is not None:
    shutil.copy(f"{result['final']}/model.safetensors", f"{out}/weights.safetensors")  # gathered when sharded
    with open(f"{out}/history.json", "w") as fh:
        json.dump(result["history"], fh)
