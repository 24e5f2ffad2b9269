"""Run by test_eval under torchrun (two ranks) and plainly (one process): lm-eval on local tasks,
rank 0 writes the results as JSON."""

import json
import sys

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from dlm.eval.harness import DLMEvalModel

checkpoint, tasks_dir, out = sys.argv[1:4]
lm = DLMEvalModel(pretrained=checkpoint, mc_num=8, batch_size=4, block_length=8, gen_length=16, greedy_check=False)
results = simple_evaluate(
    model=lm,
    tasks=["dlm_repeat", "dlm_repeat_mc", "dlm_stdlib_ppl"],
    task_manager=TaskManager(include_path=tasks_dir),
    limit=5,
)
if lm.rank == 0:
    with open(out, "w") as fh:
        json.dump({"world_size": lm.world_size, "results": results["results"]}, fh, default=str)
