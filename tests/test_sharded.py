"""The sharded path on CPU: dlm's training loop under accelerate's FSDP2 engine over two gloo ranks
(torch's ``fully_shard`` runs on CPU; dlm switches accelerate's FSDP2 path on for CPU ranks).

Against one unsharded process with the same global batch: the same losses and final weights; a
sharded checkpoint is written atomically, resumes bit-exactly and exports the full model."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_script, tiny_recipe
from dlm.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

ACCELERATE = Path(__file__).parents[1] / "recipes" / "accelerate"


def launch_args(config: str, *extra: str):
    """What ``accelerate launch --config_file CONFIG`` makes of a shipped config (accelerate's own parser)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / config), *extra, "train.py"])
    return _validate_launch_command(args)[0]


def launch_env(config: str) -> dict[str, str]:
    """The FSDP settings ``accelerate launch`` exports to its processes for ``config``."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(launch_args(config, "--num_processes", "2"))
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


FSDP2 = launch_env("fsdp2.yaml")  # the shipped config, as accelerate launch passes it on


@pytest.mark.parametrize(
    "config, kind, stage, processes, machines",
    [
        ("ddp.yaml", "ddp", None, 8, 1),
        ("fsdp2.yaml", "fsdp", None, 8, 1),
        ("zero2.yaml", "deepspeed", 2, 8, 1),
        ("zero3.yaml", "deepspeed", 3, 8, 1),
        ("fsdp2-multinode.yaml", "fsdp", None, 16, 2),
    ],
)
def test_the_shipped_accelerate_configs_are_what_they_say(config, kind, stage, processes, machines):
    args = launch_args(config)
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert args.use_fsdp == (kind == "fsdp") and args.use_deepspeed == (kind == "deepspeed")
    if stage is not None:
        assert int(args.zero_stage) == stage
    if kind == "fsdp":
        assert launch_env(config)["FSDP_VERSION"] == "2"


def recipe_file(tmp_path: Path, **train) -> Path:
    cfg = tiny_recipe(
        tmp_path, sample={"num_samples": 0}, train={"max_steps": 4, "save_every": 2, "eval_every": 2, **train}
    )
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    return path


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def sharded(recipe: Path, out: Path, *extra: str, env=None, check=True):
    return run_script(
        "dist_train.py", recipe, f"train.output_dir={out}", "train.micro_batch_size=2", *extra,
        processes=2, env={**FSDP2, **(env or {})}, check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four steps under FSDP2 on two ranks (EMA on) and in one process, same global batch of 4."""
    tmp = tmp_path_factory.mktemp("sharded")
    recipe = recipe_file(tmp, ema_decay=0.9)
    sharded(recipe, tmp / "fsdp")
    run_script("dist_train.py", recipe, f"train.output_dir={tmp / 'one'}", "train.micro_batch_size=4")
    return tmp, recipe


def test_fsdp2_on_two_ranks_trains_what_one_process_trains(runs):
    tmp, _ = runs
    l2, l1 = losses(tmp / "fsdp"), losses(tmp / "one")
    assert l2.keys() == l1.keys() == {1, 2, 3, 4}
    assert all(abs(l2[s] - l1[s]) < 1e-4 for s in l1), (l2, l1)
    w2, w1 = final_weights(tmp / "fsdp"), final_weights(tmp / "one")  # exported with the EMA weights
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


def test_sharded_checkpoints_hold_shards_and_every_rank_ema(runs):
    tmp, _ = runs
    newest = list_checkpoints(tmp / "fsdp")[-1]
    assert newest.name == "checkpoint-4"
    assert list((newest / "pytorch_model_fsdp_0").glob("*.distcp")) and list((newest / "optimizer_0").glob("*.distcp"))
    assert not (newest / "model.safetensors").exists()  # the model is sharded: no process holds it whole
    assert (newest / "ema-0.safetensors").is_file() and (newest / "ema-1.safetensors").is_file()
    shard0, shard1 = load_file(newest / "ema-0.safetensors"), load_file(newest / "ema-1.safetensors")
    full = final_weights(tmp / "fsdp")["embed_tokens.weight"]
    assert shard0["embed_tokens.weight"].shape[0] + shard1["embed_tokens.weight"].shape[0] == full.shape[0]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["identity"]["engine"] == "fsdp2"


def test_a_sharded_run_resumes_bit_exactly(runs):
    tmp, recipe = runs
    straight = tmp / "straight"
    sharded(recipe, straight, "train.max_steps=6")
    resumed = tmp / "resumed"
    sharded(recipe, resumed, "train.max_steps=6", env={"DLM_TEST_EXIT_AFTER_SAVE": "4"})  # killed after 4
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-2", "checkpoint-4"]
    sharded(recipe, resumed, "train.max_steps=6")  # the same command: resumes at checkpoint-4
    ls, lr = losses(straight), losses(resumed)
    assert ls == lr
    ws, wr = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_resumable(runs):
    tmp, recipe = runs
    out = tmp / "killed"
    died = sharded(recipe, out, env={"DLM_TEST_DIE_AT_SAVE": "4"}, check=False)
    assert died.returncode != 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # 4 never completed
    sharded(recipe, out)  # resumes from checkpoint-2 and finishes
    assert losses(out) == losses(tmp / "fsdp")


def test_another_engine_is_refused_on_resume(runs):
    tmp, recipe = runs
    res = run_script(
        "dist_train.py", recipe, f"train.output_dir={tmp / 'fsdp'}", "train.micro_batch_size=2",
        "train.max_steps=6", processes=2, check=False,
    )  # fmt: skip
    assert res.returncode != 0 and "engine: 'fsdp2' → 'whole'" in res.stderr  # DDP into an FSDP2 run


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    from conftest import REPEAT_SFT, train_tiny

    tmp = tmp_path_factory.mktemp("sft")
    train = {"max_steps": 60, "save_every": 60, "eval_every": 60}
    return train_tiny(tmp, objective="sft", data=REPEAT_SFT, train=train)


#: rollouts of data-dependent length (the threshold rule decodes as many tokens per step as are
#: confident), trajectory rows in batches of 3 (the two ranks make different numbers of row
#: forwards) and a KL reference (sharded too)
UNEVEN = {
    "decode": {"rule": "threshold", "threshold": 0.01},
    "rl": {"beta": 0.05, "row_batch_size": 3, "save_rollouts_every": 1},
}


def decode_forwards(rollouts: Path, group: int = 3, block: int = 4) -> dict[int, int]:
    """Per RL step, the model calls a rank's rollouts took: per prompt group and block, the most
    decoding steps any of its rows took there."""
    rows = [json.loads(line) for line in rollouts.read_text().splitlines()]
    calls: dict[int, int] = {}
    for i in range(0, len(rows), group):
        members = rows[i : i + group]
        for b in range(0, len(members[0]["step_map"]), block):
            used = max(len({s for s in m["step_map"][b : b + block] if s >= 0}) for m in members)
            calls[members[0]["step"]] = calls.get(members[0]["step"], 0) + used
    return calls


def rl(sft, out: Path, per_rank: int, processes: int, env=None, **extra):
    sections = {k: {**v, **extra.get(k, {})} for k, v in UNEVEN.items()} | {
        k: v for k, v in extra.items() if k not in UNEVEN
    }
    run_script("dist_rl.py", sft, out, per_rank, "trajectory", json.dumps(sections), processes=processes, env=env)


LORA = {"lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}}


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp2-lora", "ddp"])
def test_rl_on_two_ranks_trains_what_one_process_trains(sft, tmp_path, engine):
    """Two ranks whose rollouts end unevenly (other step counts, token counts, row forwards) train
    the weights one process trains on the whole global batch: under FSDP2 (sharded policy and
    reference — for LoRA the sharded base with its adapters off — gathered rollouts, evened row
    forwards) and DDP (the loss divided by each rank's share of the global count). A sharded run
    killed after a checkpoint resumes to the same weights, bit for bit."""
    extra = {**(LORA if engine.endswith("lora") else {}), "train": {"save_every": 1}}
    env = FSDP2 if engine.startswith("fsdp2") else None
    rl(sft, tmp_path / "two", 2, 2, env=env, **extra)
    rl(sft, tmp_path / "one", 4, 1, **extra)
    calls = [decode_forwards(tmp_path / "two" / f"rollouts-{rank}.jsonl") for rank in (0, 1)]
    assert calls[0] != calls[1], f"the ranks should decode for different numbers of forwards: {calls}"
    a, b = (load_file(tmp_path / d / "weights.safetensors") for d in ("two", "one"))
    initial = load_file(Path(sft) / "final" / "model.safetensors")
    assert any(not torch.equal(b[k], initial[k]) for k in initial)  # the run did update the model
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ha, hb = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("two", "one"))
    for x, y in zip(ha, hb, strict=True):
        for key in ("held_out_reward", "reward_mean", "completion_length"):
            if key in y:
                assert x[key] == pytest.approx(y[key], abs=1e-5), key
    if "lora" in extra:  # the adapter alone as well as the merged model
        adapters = [load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("two", "one")]
        assert adapters[0].keys() == adapters[1].keys() and any("lora_B" in k for k in adapters[0])
    checkpoint = tmp_path / "two" / "checkpoint-1"
    if engine == "ddp":
        assert (checkpoint / "model.safetensors").is_file()
        return
    assert list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")), "an FSDP2 RL checkpoint is sharded"
    # killed after checkpoint 1, the same command resumes there and ends at the same weights, bit for bit
    resumed = tmp_path / "resumed"
    rl(sft, resumed, 2, 2, env={**FSDP2, "DLM_TEST_EXIT_AFTER_SAVE": "1"}, **extra)
    assert not (resumed / "weights.safetensors").exists()
    rl(sft, resumed, 2, 2, env=FSDP2, **extra)
    c = load_file(resumed / "weights.safetensors")
    assert all(torch.equal(c[k], a[k]) for k in a)


GPU_ENGINES = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="accelerate runs FSDP and DeepSpeed configs on accelerators only"
)


@GPU_ENGINES
@pytest.mark.parametrize("config", ["fsdp2.yaml", "zero2.yaml", "zero3.yaml"])
def test_the_shipped_engine_configs_train_checkpoint_and_resume_on_one_gpu(tmp_path, config):
    """On a GPU machine: 20 steps of a tiny recipe under each shipped engine config (one process),
    killed after checkpoint 10 and resumed, end at the losses of the uninterrupted run."""
    import importlib.util
    import os
    import subprocess
    import sys

    if config.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed)")
    recipe = recipe_file(tmp_path, max_steps=20, save_every=10, eval_every=10)

    def launch(out: Path, env=None):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
            "--num_processes", "1", "--mixed_precision", "bf16", str(Path(__file__).parent / "dist_train.py"),
            str(recipe), f"train.output_dir={out}", "train.mixed_precision=bf16",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **(env or {})}
        return subprocess.run(cmd, env=env, timeout=900, check=True)

    launch(tmp_path / "straight")
    launch(tmp_path / "resumed", env={"DLM_TEST_EXIT_AFTER_SAVE": "10"})
    launch(tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert (tmp_path / "resumed" / "final" / "model.safetensors").is_file()
