"""`dlm rl`: the loop runs, logs what it promises, exports, resumes exactly, and rejects bad recipes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model, train_tiny
from dlm.config import ConfigError, from_dict, to_dict
from dlm.train.rl.loop import RLRecipe, main

TASK = {"period": 4, "repeats": 2}


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = {"dataset": "task:repeat", "format": "chat", "task_args": TASK, "max_documents": 64, "seq_len": 16}
    return train_tiny(tmp, objective="sft", data={**data, "val_fraction": 0.1})


def recipe(sft, out, **train):
    return from_dict(
        RLRecipe,
        {
            "seed": 3,
            "rl": {
                "init": sft,
                "task_args": TASK,
                "prompts_per_step": 2,
                "group_size": 3,
                "eval_every": 1,
                "eval_prompts": 4,
                "drop_zero_variance": False,
                "save_rollouts_every": 1,
            },
            "decode": {"decoder": "confidence", "gen_length": 8, "steps": 8, "block_length": 4},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "train": {"output_dir": str(out), "max_steps": 2, "save_every": 1, "plot": True, **train},
        },
    )


def varied(cfg: RLRecipe) -> RLRecipe:
    """The recipe with a second reward that differs within a group even for the untrained model (the copy
    reward alone is 0 for every completion: zero advantages, no update to check)."""
    data = to_dict(cfg)
    data["rl"]["rewards"] = {"repeat": 1.0, "tests_rewards:variety": 1.0}
    return from_dict(RLRecipe, data)


def test_rl_loop_logs_exports_and_resumes_exactly(sft, tmp_path):
    out = tmp_path / "rl"
    first = main(varied(recipe(sft, out)))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and "held_out_reward" in log[0]
    for key in (
        "reward_mean",
        "reward_std",
        "accuracy",
        "zero_variance_share",
        "kl",
        "clip_fraction",
        "completion_length",
        "held_out_reward",
    ):
        assert key in log[1]
    assert (out / "final" / "model.safetensors").is_file() and (out / "rewards.png").is_file()
    rollouts = [json.loads(line) for line in (out / "rollouts-0.jsonl").read_text().splitlines()]
    assert [(r["step"], r["group"]) for r in rollouts] == [(s, g) for s in (1, 2) for g in (0, 0, 0, 1, 1, 1)]
    for r in rollouts:  # every completion token has its decoding step and log-prob; rewards are logged
        assert len(r["tokens"]) == len(r["step_map"]) == len(r["logprobs"]) == 8
        assert sorted(r["step_map"]) == list(range(8)) and all(lp <= 0 for lp in r["logprobs"])
        assert r["reward"] == pytest.approx(sum(r["rewards"].values())) and r["decoder"]["decoder"] == "confidence"
    # resume from checkpoint-1 and redo step 2: the same record, and no duplicated rollouts
    (out / "final").rename(tmp_path / "first-final")
    second = main(varied(recipe(sft, out)))
    assert [h["step"] for h in second["history"]] == [2]  # started after checkpoint-1, not from scratch
    assert second["history"][-1] == first["history"][-1]
    assert [json.loads(line) for line in (out / "rollouts-0.jsonl").read_text().splitlines()] == rollouts
    # and the same final weights, bit for bit (a log line can agree while the update differs)
    straight, resumed = (load_file(d / "model.safetensors") for d in (tmp_path / "first-final", out / "final"))
    at_checkpoint = load_file(out / "checkpoint-1" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(at_checkpoint[k], resumed[k]) for k in at_checkpoint)  # step 2 did update them


def test_rl_recipe_errors_name_the_fix(sft, tmp_path):
    with pytest.raises(ConfigError, match="group_size=1: group-relative advantages need at least 2"):
        from_dict(RLRecipe, {"rl": {"init": sft, "group_size": 1}})
    with pytest.raises(ConfigError, match="unknown reward 'acuracy'; known rewards:"):
        from_dict(RLRecipe, {"rl": {"init": sft, "rewards": {"acuracy": 1.0}}})
    with pytest.raises(ConfigError, match="rl.beta=-0.1 must be >= 0"):
        from_dict(RLRecipe, {"rl": {"init": sft, "beta": -0.1}})
    with pytest.raises(ConfigError, match="rl.eps_high=-0.2 must be >= 0"):
        from_dict(RLRecipe, {"rl": {"init": sft, "eps_high": -0.2}})
    with pytest.raises(ConfigError, match="rl.init is required"):
        from_dict(RLRecipe, {"rl": {}})
    with pytest.raises(ConfigError, match="rl.estimator='grpo'; choose one of coupled, one_step, trajectory"):
        from_dict(RLRecipe, {"rl": {"init": sft, "estimator": "grpo"}})


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["trajectory", "coupled", "one_step"])
def test_two_process_rl_matches_one_process_with_the_same_global_batch(sft, tmp_path, estimator):
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from conftest import run_script

    two, one = tmp_path / "two", tmp_path / "one"
    # random masks (coupled, one_step) come from per-prompt-group generators and ignore padding width
    run_script("dist_rl.py", sft, two, 2, estimator, processes=2)
    run_script("dist_rl.py", sft, one, 4, estimator)
    a, b = load_file(two / "weights.safetensors"), load_file(one / "weights.safetensors")
    initial = load_file(Path(sft) / "final" / "model.safetensors")
    assert any(not torch.equal(b[k], initial[k]) for k in initial)  # the run did update the model
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (two, one))
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [0, 1, 2]
    for x, y in zip(ha, hb):
        for key in ("held_out_reward", "reward_mean", "completion_length"):
            if key in y:
                assert x[key] == pytest.approx(y[key], abs=1e-6), key


def test_lora_rl_trains_only_adapters_uses_the_base_as_reference_and_resumes(sft, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "lora"
    lora = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}

    def lora_recipe():
        plain = to_dict(recipe(sft, out))
        rl = {**plain["rl"], "beta": 0.05, "rewards": {"tests_rewards:variety": 1.0}}
        return from_dict(RLRecipe, {**plain, "rl": rl, "lora": lora})

    first = main(lora_recipe())
    log = first["history"]
    # step 1's update starts from B = 0: policy == reference, so its KL is exactly zero; then it moves
    assert log[1]["kl"] == pytest.approx(0.0, abs=1e-7) and log[2]["kl"] > 0
    initial = load_file(f"{sft}/final/model.safetensors")
    merged = load_file(out / "final" / "model.safetensors")
    changed = {k for k in initial if not torch.equal(initial[k], merged[k])}
    assert changed and all(any(m in k for m in ("q_proj", "v_proj", "up_proj")) for k in changed)
    # the exported adapter on the base model reproduces the merged model
    base = AutoModel.from_pretrained(f"{sft}/final")
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    x = torch.randint(0, 40, (2, 12))
    torch.testing.assert_close(
        with_adapter(input_ids=x).logits, AutoModel.from_pretrained(out / "final")(input_ids=x).logits
    )
    # resume from checkpoint-1 (an adapter checkpoint) and redo step 2: the same record
    (out / "final").rename(tmp_path / "first-final")
    assert main(lora_recipe())["history"][-1] == log[-1]
    with pytest.raises(ConfigError, match="holds a run of another recipe .*lora.r: 4 → 0"):
        main(recipe(sft, out))
    with pytest.raises(ConfigError, match=r"lora.target_modules=\['qproj'\].*linear layers: .*'q_proj'"):
        main(
            from_dict(RLRecipe, {**to_dict(recipe(sft, tmp_path / "x")), "lora": {"r": 2, "target_modules": ["qproj"]}})
        )


def test_rl_on_a_block_causal_model_trains_with_vectorised_trajectory_rows(tmp_path):
    import torch
    from safetensors.torch import load_file

    bd3 = train_tiny(tmp_path / "bd3", objective="bd3lm", diffusion={"block_size": 4})
    cfg = to_dict(recipe(bd3, tmp_path / "rl"))
    cfg["rl"] = {**cfg["rl"], "task": "repeat", "rewards": {"tests_rewards:variety": 1.0}, "group_size": 4}
    cfg["decode"] = {"decoder": "confidence", "gen_length": 8, "steps": 8, "block_length": 4}
    cfg["train"] = {**cfg["train"], "max_steps": 1}
    result = main(from_dict(RLRecipe, cfg))
    assert result["history"][-1]["reward_std"] > 0
    before = load_file(f"{bd3}/final/model.safetensors")
    after = load_file(tmp_path / "rl" / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def remote_code_checkpoint(root, tokenizer_from) -> str:
    """A LLaDA-shaped checkpoint with its own modelling code and no mask_token_id in its config."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    code = root / "code"
    shutil.copytree(Path(__file__).parent / "remote_model", code)
    auto = {
        "AutoConfig": "configuration_tiny_llada.TinyLLaDAConfig",
        "AutoModel": "modeling_tiny_llada.TinyLLaDAModelLM",
    }
    (code / "config.json").write_text(json.dumps({"model_type": "tiny_llada", "auto_map": auto}))
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(code, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(root / "model")  # copies the modelling code next to the weights
    AutoTokenizer.from_pretrained(f"{tokenizer_from}/final").save_pretrained(root / "model")
    return str(root / "model")


def test_rl_drives_a_remote_code_checkpoint_with_lora(sft, tmp_path):
    import torch
    from transformers import AutoModel

    ckpt = remote_code_checkpoint(tmp_path, sft)
    cfg = to_dict(recipe(ckpt, tmp_path / "rl"))
    rl = {**cfg["rl"], "trust_remote_code": True, "beta": 0.05, "rewards": {"tests_rewards:variety": 1.0}}
    lora = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError, match="has no mask_token_id in its config; set rl.mask_token_id"):
        main(from_dict(RLRecipe, {**cfg, "rl": rl, "lora": lora}))
    result = main(from_dict(RLRecipe, {**cfg, "rl": {**rl, "mask_token_id": 1}, "lora": lora}))
    assert [h["step"] for h in result["history"]] == [0, 1, 2] and result["history"][-1]["kl"] > 0
    merged = AutoModel.from_pretrained(tmp_path / "rl" / "final", trust_remote_code=True)
    base = AutoModel.from_pretrained(ckpt, trust_remote_code=True)
    before = dict(base.named_parameters())
    moved = [n for n, p in merged.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved)


def test_rl_compare_groups_seeds_into_one_row_and_one_curve(tmp_path):
    from dlm.cli import main as cli_main

    for name, finals, wall in (("a-seed0", 0.5, 10.0), ("a-seed1", 0.7, 30.0), ("b", 0.2, None)):
        run = tmp_path / name
        run.mkdir()
        records = [
            {"step": 0, "held_out_reward": 0.4},
            {"step": 1, "reward_mean": 0.3},
            {"step": 2, "held_out_reward": finals},
        ]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if wall is not None:
            (run / "run.json").write_text(json.dumps({"wall_seconds": wall}))
    from dlm.train.rl.compare import main as compare

    text = compare([str(tmp_path / n) for n in ("a-seed0", "a-seed1", "b")], str(tmp_path / "cmp.png"))
    assert "| a | 2 | 0.400 | 0.600 ± 0.141 | 0.500 / 0.700 | 20 s |" in text
    assert "| b | 1 | 0.400 | 0.200 ± 0.000 | 0.200* | — |" in text and "* no run.json" in text
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert cli_main(["rl-compare", str(tmp_path / "b")]) == 0
    with pytest.raises(FileNotFoundError, match="has no log.jsonl: is it a dlm rl output_dir"):
        compare([str(tmp_path)], None)


@pytest.mark.parametrize("family, estimator", [("dream", "trajectory"), ("sdar", "coupled")])
def test_rl_runs_on_a_published_family_checkpoint_converted_on_the_fly(tmp_path, monkeypatch, family, estimator):
    from references import write_checkpoint

    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    write_checkpoint(family, tmp_path / family)  # Dream: shifted logits; SDAR: block-causal (blocks of 4)
    cfg = to_dict(recipe(str(tmp_path / family), tmp_path / "rl"))
    rl = {**cfg["rl"], "estimator": estimator, "rewards": {"tests_rewards:variety": 1.0}}
    decode = {**cfg["decode"], "cache": "dual"}
    result = main(from_dict(RLRecipe, {**cfg, "rl": rl, "decode": decode}))
    assert [h["step"] for h in result["history"]] == [0, 1, 2]
    assert result["model"].config.model_type == "dlm" and (tmp_path / "cache" / "converted").is_dir()


def test_dlm_rl_command_runs_a_recipe_with_overrides(sft, tmp_path, capsys):
    import yaml

    from dlm.cli import main as cli_main

    path, out = tmp_path / "rl.yaml", tmp_path / "cli"
    path.write_text(yaml.safe_dump(to_dict(recipe(sft, tmp_path / "from-yaml"))))
    assert cli_main(["rl", str(path), f"train.output_dir={out}", "train.max_steps=1", "rl.group_size=2"]) == 0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1]
    rollouts = [json.loads(line) for line in (out / "rollouts-0.jsonl").read_text().splitlines()]
    assert [r["group"] for r in rollouts] == [0, 0, 1, 1]  # 2 prompts x group_size 2
    ran = json.loads((out / "run.json").read_text())["recipe"]
    assert ran["train"]["max_steps"] == 1 and ran["rl"]["init"] == sft and ran["rl"]["group_size"] == 2
    assert (out / "final" / "model.safetensors").is_file() and not (tmp_path / "from-yaml").exists()
    assert "held-out reward" in capsys.readouterr().out
    assert cli_main(["rl", str(path), "rl.estimator=grpo"]) == 2
    assert "rl.estimator='grpo'; choose one of coupled, one_step, trajectory" in capsys.readouterr().err


def test_sequence_and_none_normalisation_divide_by_what_they_say():
    from dlm.train.rl.loss import policy_loss

    # rollout 0 trains 3 tokens, rollout 1 one token; masked columns hold values that must not count
    mask = torch.tensor([[True, True, True, False], [False, True, False, False]])
    logp_new = torch.tensor([[0.1, -0.1, 0.05, 3.0], [2.0, 0.02, -3.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ratio = logp_new.exp()  # logp_old = 0; every trained ratio lies inside the clip range
    per_token = -ratio * adv[:, None]  # unclipped PPO term
    n = mask.sum(1)
    want = {
        "sequence": (per_token[0, :3].sum() / 3 + per_token[1, 1] / 1) / 2,  # mean per rollout, then over rollouts
        "none": per_token[0, :3].sum() + per_token[1, 1],  # plain sum
        "token": (per_token[0, :3].sum() + per_token[1, 1]) / 4,  # mean over the batch's tokens
    }
    weight = {  # d loss / d per_token
        "sequence": 1 / (n[:, None] * len(n)),
        "none": torch.ones(2, 1, dtype=torch.float64),
        "token": torch.full((2, 1), 1 / 4, dtype=torch.float64),
    }
    for norm in ("sequence", "none", "token"):
        new = logp_new.clone().requires_grad_()
        res = policy_loss(new, torch.zeros_like(new), adv, mask, norm=norm)
        assert res.loss.item() == pytest.approx(want[norm].item(), rel=1e-12), norm
        res.loss.backward()
        expected = torch.where(mask, -ratio * adv[:, None] * weight[norm], torch.zeros_like(ratio))
        torch.testing.assert_close(new.grad, expected, msg=norm)


def rollout_batch(model, block_length: int = 4):
    """Two ragged, left-padded prompts and their confidence-decoded completions (8 tokens, temperature 1)."""
    from dlm.decode import build_decoder
    from dlm.train.rl.estimators import Rollouts

    prompt = torch.randint(0, 63, (2, 5), generator=torch.Generator().manual_seed(1))
    pad = torch.ones_like(prompt)
    pad[1, :2] = 0
    dec = build_decoder("confidence", gen_length=8, steps=8, block_length=block_length, eos_token_id=None)
    out = dec(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0))
    full_pad = torch.cat([pad, torch.ones(2, 8, dtype=torch.long)], dim=1)
    return out, Rollouts(out.canvas, out.step_map, out.prompt_length, full_pad)


@torch.no_grad()
def test_shrink_scores_each_group_of_steps_from_the_state_before_its_first_step():
    """``rl.shrink = s``: a token decoded at the j-th step of a group of s steps is scored from the
    canvas as it was before the group's first step (its group-mates still masked), recomputed here
    one model call per token; tokens decoded at a group's first step keep their decode-time log-prob."""
    from dlm.train.objectives import subs_log_probs
    from dlm.train.rl.estimators import build_rows, token_logprobs

    model = tiny_model(seed=2)
    out, r = rollout_batch(model)
    rows = build_rows("trajectory", r, 63, shrink=3)
    logp = token_logprobs(model, r, rows, 63)
    firsts = laters = 0
    for b in range(2):
        steps = sorted(set(r.step_map[b][r.trainable[b]].tolist()))
        assert (rows.owner == b).sum() == -(-len(steps) // 3)
        for col in r.trainable[b].nonzero().squeeze(-1).tolist():
            rank = steps.index(int(r.step_map[b, col]))
            start = steps[rank - rank % 3]  # the group's first step
            state = r.tokens[b].masked_fill(r.step_map[b] >= start, 63)[None]
            logits = model(input_ids=state, attention_mask=r.pad[b][None]).logits[0, col]
            want = subs_log_probs(logits, 63)[r.tokens[b, col]]
            assert logp[b, col].item() == pytest.approx(want.item(), abs=1e-5)
            if rank % 3 == 0:
                firsts += 1
                assert logp[b, col].item() == pytest.approx(out.logprobs[b, col].item(), abs=1e-4)
            else:
                laters += 1
    assert firsts and laters  # both kinds of token were checked


def test_the_rl_loop_builds_trajectory_rows_with_its_shrink():
    from dlm.config import from_dict
    from dlm.train.rl.estimators import build_rows
    from dlm.train.rl.loop import make_rows

    _, r = rollout_batch(tiny_model(seed=2))
    for shrink in (1, 3):
        cfg = from_dict(RLRecipe, {"rl": {"init": "x", "estimator": "trajectory", "shrink": shrink, "group_size": 2}})
        rows = make_rows(cfg, r, 63, None, 0, 0, 1, 0)
        assert rows.inputs.shape[0] == 2 * -(-8 // shrink)  # 8 decoding steps per rollout
        assert torch.equal(rows.inputs, build_rows("trajectory", r, 63, shrink=shrink).inputs)


@torch.no_grad()
@pytest.mark.parametrize(
    "estimator, block_causal",
    [("trajectory", False), ("coupled", False), ("one_step", False), ("trajectory", True), ("coupled", True)],
)
def test_row_batch_size_does_not_change_the_log_probs(estimator, block_causal):
    from dlm.train.rl.estimators import build_rows, token_logprobs

    blocks = dict(attention_mode="block_causal", block_size=4) if block_causal else {}
    model = tiny_model(seed=4, **blocks)
    _, r = rollout_batch(model)
    kw = {"generator": torch.Generator().manual_seed(3)} if estimator != "trajectory" else {}
    rows = build_rows(estimator, r, 63, block_size=4 if block_causal else None, **kw)
    assert rows.inputs.shape[0] >= 2  # several row batches at batch size 1
    one, every = (token_logprobs(model, r, rows, 63, batch_size=n) for n in (1, rows.inputs.shape[0]))
    assert (one[r.trainable] < 0).all()
    torch.testing.assert_close(one, every, atol=1e-5, rtol=1e-5)


def test_the_rl_loop_passes_norm_and_row_batch_size_and_row_batches_do_not_change_the_run(sft, tmp_path, monkeypatch):
    import inspect

    import dlm.train.rl.loop as loop

    seen = {"norm": set(), "batch_size": set()}

    def spy(name, arg):
        real = getattr(loop, name)

        def call(*args, **kwargs):
            bound = inspect.signature(real).bind(*args, **kwargs)
            bound.apply_defaults()
            seen[arg].add(bound.arguments[arg])
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, name, call)

    spy("policy_loss", "norm")
    spy("token_logprobs", "batch_size")
    finals = []
    for batch in (1, 64):
        cfg = to_dict(varied(recipe(sft, tmp_path / f"rows-{batch}", max_steps=1)))
        cfg["rl"] = {**cfg["rl"], "norm": "sequence", "shrink": 2, "row_batch_size": batch, "eval_every": 100}
        main(from_dict(RLRecipe, cfg))
        finals.append(load_file(tmp_path / f"rows-{batch}" / "final" / "model.safetensors"))
    assert seen == {"norm": {"sequence"}, "batch_size": {1, 64}}
    initial = load_file(f"{sft}/final/model.safetensors")
    assert any(not torch.equal(finals[0][k], initial[k]) for k in initial)
    for k in initial:  # the batches sum gradients in another order: Adam turns ~1e-9 into ~1e-6 where a gradient is ~0
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=1e-5, rtol=1e-5)


def test_held_out_reward_is_measured_in_eval_mode(sft, tmp_path, monkeypatch):
    """LoRA dropout (or any dropout) must not reach the reported reward: every held-out decode runs
    with the model in eval mode, and training resumes in train mode afterwards."""
    from dlm.train.rl import loop as rl_loop

    modes = []
    real = rl_loop.make_decoder

    def spying(settings, greedy=False):
        decoder = real(settings, greedy)
        if not greedy:
            return decoder

        def call(model, *args, **kwargs):
            modes.append(model.training)
            return decoder(model, *args, **kwargs)

        return call

    monkeypatch.setattr(rl_loop, "make_decoder", spying)
    cfg = recipe(sft, tmp_path / "rl")
    data = to_dict(varied(cfg))
    data["lora"] = {"r": 2, "dropout": 0.5, "target_modules": ["q_proj"]}
    main(from_dict(RLRecipe, data))
    assert modes and not any(modes), modes


def test_rl_refuses_the_engines_it_does_not_run_with_the_fix():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dlm.train.rl.loop import check_engine

    def acc(kind, version=2):
        return SimpleNamespace(
            distributed_type=kind, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
        )

    with pytest.raises(ConfigError, match="does not run under DeepSpeed yet.*fsdp2.yaml"):
        check_engine(acc(DistributedType.DEEPSPEED))
    with pytest.raises(ConfigError, match="FSDP2 only: set fsdp_version: 2"):
        check_engine(acc(DistributedType.FSDP, version=1))
    for kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.FSDP):
        check_engine(acc(kind))  # what dlm rl runs on, full or LoRA


def chunked_backward_setup(dropout: float):
    """A LoRA-wrapped tiny model (adapter dropout in train mode), its trajectory rows, and the
    policy loss of the rollouts as a function of their token log-probs."""
    from dlm.train.config import LoraConfig
    from dlm.train.rl.estimators import build_rows, token_logprobs
    from dlm.train.rl.loss import policy_loss

    base = tiny_model(seed=4)
    _, r = rollout_batch(base)
    rows = build_rows("trajectory", r, 63)
    with torch.no_grad():
        old = token_logprobs(base, r, rows, 63)
    model = LoraConfig(r=4, dropout=dropout).wrap(base).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: move off it so the adapters change the log-probs
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    adv = torch.tensor([1.0, -0.5])

    def loss_of(new):
        return policy_loss(new, old, adv, r.trainable, 0.2, 0.2, old - 0.1, 0.05)

    return model, r, rows, loss_of


def test_row_batch_backward_is_the_one_graph_backward_with_the_same_dropout_masks():
    """RL's loss backpropagates one row batch at a time (a no-grad pass for ∂loss/∂logp, then each
    batch again): its gradient equals one graph over every batch that saw the same dropout masks,
    and the update-time loss it reports is that graph's."""
    from dlm.train.engine import make_accelerator
    from dlm.train.rl.estimators import token_logprobs
    from dlm.train.rl.loop import backward_by_row_batch, row_batches

    model, r, rows, loss_of = chunked_backward_setup(dropout=0.5)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert rows.inputs.shape[0] > 4  # several batches of 2

    torch.manual_seed(11)  # the reference: the same forwards in one graph, one backward
    new = sum(token_logprobs(model, r, part, 63, 2) for part, _ in row_batches(rows, 2, 0))
    ref = loss_of(new)
    ref.loss.backward()
    expected = [p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)

    torch.manual_seed(11)
    res = backward_by_row_batch(make_accelerator(), model, r, rows, 63, 2, 0, loss_of, local=True)
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=1e-6) and res.kl == pytest.approx(ref.kl, rel=1e-6)
    for got, want in zip((p.grad for p in trained), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in expected)


def test_row_batch_backward_holds_one_row_batch_of_activations_at_a_time():
    """What the backward keeps alive: the bytes saved for backward peak at about one row batch's,
    not at every batch's (the one-graph backward's), so RL's memory does not grow with the rows."""
    from dlm.train.engine import make_accelerator
    from dlm.train.rl.loop import backward_by_row_batch

    model, r, rows, loss_of = chunked_backward_setup(dropout=0.0)

    def peak_saved(batch_size: int) -> int:
        live, peak = [0], [0]

        class Held:
            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                live[0] += self.n
                peak[0] = max(peak[0], live[0])

            def __del__(self):
                live[0] -= self.n

        with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.t):
            backward_by_row_batch(make_accelerator(), model, r, rows, 63, batch_size, 0, loss_of, local=True)
        model.zero_grad(set_to_none=True)
        return peak[0]

    n = rows.inputs.shape[0]
    one_graph, by_batch = peak_saved(n), peak_saved(2)
    assert by_batch < one_graph * 3 / n, (by_batch, one_graph, n)
