"""Reasoning-gym datasets as dlm tasks and rewards: prompts, scorers, errors, SFT data, the RL loop."""

import json

import pytest

from dlm.config import ConfigError, from_dict
from dlm.tasks import extract_answer, generate, score
from dlm.train.rl.rewards import RewardError, combine, resolve

RG = ["countdown", "mini_sudoku", "basic_arithmetic"]


@pytest.mark.parametrize("name", RG)
def test_reasoning_gym_task_is_deterministic_and_its_reward_scores_the_reference_answer(name):
    small, large = generate(name, 3, seed=7), generate(name, 6, seed=7)
    assert [e["prompt"] for e in small] == [e["prompt"] for e in large[:3]]  # example i depends on (seed, i)
    assert [e["prompt"] for e in generate(name, 3, seed=8)] != [e["prompt"] for e in small]
    prompts = [e["prompt"] for e in small]
    fields = {"entry": [e["entry"] for e in small], "answer": [e["answer"] for e in small]}
    right = [f"let me think\n<answer>{e['answer']}</answer>" for e in small]
    assert combine({name: 1.0}, prompts, right, **fields)[0] == [1.0, 1.0, 1.0]
    assert combine({name: 1.0}, prompts, [e["answer"] for e in small], **fields)[0] == [1.0] * 3  # untagged
    wrong = combine({name: 1.0}, prompts, ["<answer>no idea</answer>"] * 3, **fields)[0]
    assert all(w < 1.0 for w in wrong)
    generic = combine({"reasoning_gym": 1.0}, prompts, right, **fields)[0]  # scorer picked per entry
    assert generic == [1.0, 1.0, 1.0]


def test_answer_extraction_takes_the_last_tag_or_the_whole_completion():
    assert extract_answer("a <answer> 1 </answer> b <answer>2</answer>") == "2"
    assert extract_answer("  12 \n") == "12"
    e = generate("basic_arithmetic", 1, seed=0)[0]
    assert score("basic_arithmetic", e, f"<answer>{e['answer']}</answer>") == 1.0


def test_unknown_task_and_reward_names_list_what_exists():
    with pytest.raises(
        ValueError,
        match=r"unknown task 'countdwn'; dlm's tasks: repeat; or one of the \d+ "
        "reasoning-gym datasets.*Did you mean 'countdown'",
    ):
        generate("countdwn", 1)
    with pytest.raises(
        ValueError, match="reasoning-gym task 'countdown' has no argument.*foo; its arguments: min_numbers"
    ):
        generate("countdown", 1, foo=3)
    with pytest.raises(
        RewardError,
        match=r"unknown reward 'mini_sodoku'; known rewards: .*reasoning-gym dataset "
        "names.*Did you mean 'mini_sudoku'",
    ):
        resolve("mini_sodoku")
    with pytest.raises(RewardError, match="reward 'countdown' needs the examples' \"entry\" field"):
        combine({"countdown": 1.0}, ["p"], ["c"])


def test_reasoning_gym_task_is_an_sft_data_source():
    from dlm.data import DataConfig, load_documents

    docs = load_documents(DataConfig(dataset="task:basic_arithmetic", format="chat", max_documents=5))
    assert len(docs) == 5 and set(docs.column_names) == {"prompt", "response", "answer"}
    assert docs[0]["prompt"] == generate("basic_arithmetic", 1, seed=0)[0]["prompt"]


def test_rl_loop_runs_on_a_reasoning_gym_task(tmp_path):
    from conftest import train_tiny
    from dlm.train.rl.loop import RLRecipe, main

    args = {"min_terms": 2, "max_terms": 2, "max_digits": 1}
    sft = train_tiny(
        tmp_path / "sft",
        objective="sft",
        data={
            "dataset": "task:basic_arithmetic",
            "format": "chat",
            "task_args": args,
            "max_documents": 32,
            "seq_len": 24,
            "val_fraction": 0.1,
        },
    )
    rl = {
        "init": sft,
        "task": "basic_arithmetic",
        "task_args": args,
        "rewards": {"basic_arithmetic": 1.0},
        "prompts_per_step": 2,
        "group_size": 2,
        "eval_every": 1,
        "eval_prompts": 2,
        "drop_zero_variance": False,
        "system_prompt": "Answer in <answer></answer> tags.",
    }
    cfg = from_dict(
        RLRecipe,
        {
            "rl": rl,
            "decode": {"decoder": "confidence", "gen_length": 8, "block_length": 8},
            "train": {"output_dir": str(tmp_path / "rl"), "max_steps": 1, "save_every": 5, "plot": False},
        },
    )
    main(cfg)
    log = [json.loads(line) for line in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert "reward/basic_arithmetic" in log[-1] and 0.0 <= log[-1]["reward_mean"] <= 1.0
    with pytest.raises(ConfigError, match="rl.task: unknown task 'basic_arithmatic'.*Did you mean"):
        from_dict(RLRecipe, {"rl": {**rl, "task": "basic_arithmatic"}})


def test_llada_recipe_switches_task_and_its_reward_follows():
    from dlm.config import load_recipe
    from dlm.train.rl.loop import RLRecipe

    cfg = load_recipe("recipes/rl-llada-countdown.yaml", ["rl.task=gsm_symbolic", "rl.task_args=null"], cls=RLRecipe)
    assert (cfg.rl.task, cfg.rl.task_args, cfg.lora.r, cfg.rl.estimator) == ("gsm_symbolic", {}, 128, "one_step")
    examples = generate(cfg.rl.task, 2, seed=1)
    fields = {"entry": [e["entry"] for e in examples]}
    right = [f"<answer>{e['answer']}</answer>" for e in examples]
    assert combine(dict(cfg.rl.rewards), [e["prompt"] for e in examples], right, **fields)[0] == [1.0, 1.0]


def test_math_equiv_compares_the_boxed_or_last_tagged_answer_mathematically():
    completions = [
        "so the result is \\boxed{\\frac{1}{2}}",  # equal to 0.5 as a number
        "<answer>3</answer> no wait <answer>0.5</answer>",  # the last tag counts
        "<answer>0.25</answer>",
        "1/2",  # no tag, no box: the whole completion
    ]
    got = combine({"math_equiv": 1.0}, ["p"] * 4, completions, answer=["0.5"] * 4)[0]
    assert got == [1.0, 1.0, 0.0, 1.0]
