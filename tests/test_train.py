"""End-to-end training: artefacts, exact resume, divergence handling, two processes, CLI."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel

from conftest import run_script, tiny_recipe
from dlm.cli import main as cli_main
from dlm.config import ConfigError
from dlm.train.checkpoint import list_checkpoints
from dlm.train.loop import TrainingDivergedError, main
from dlm.train.objectives import OBJECTIVES, LossOutput
from dlm.train.objectives.mdlm import MDLMObjective
from dlm.train.plot import read_log

TESTS = Path(__file__).parent


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run / "log.jsonl") if "loss" in r}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", ["mdlm", "exact_count", "ar"])
def test_training_writes_checkpoints_log_plot_and_a_loadable_model(tmp_path, objective):
    cfg = tiny_recipe(tmp_path, objective=objective)
    result = main(cfg)
    run = Path(cfg.train.output_dir)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-3", "checkpoint-6"]
    assert not list(run.glob(".tmp-*"))
    assert (run / "curves.png").stat().st_size > 1000
    assert set(losses(run)) == set(range(1, 7))
    assert result.val_ppl is not None and 1 < result.val_ppl < 1e4
    assert result.bound == ("nll" if objective == "ar" else "nelbo")
    loaded = AutoModel.from_pretrained(run / "final").eval()
    assert loaded.config.attention_mode == ("causal" if objective == "ar" else "bidirectional")
    x = torch.randint(0, 300, (1, 8))
    torch.testing.assert_close(loaded(x).logits, result.model.eval()(x).logits)
    assert result.samples and isinstance(result.samples[0], str)


def test_training_lowers_the_validation_bound(tmp_path):
    cfg = tiny_recipe(
        tmp_path,
        train={"max_steps": 40, "eval_every": 40, "save_every": 40, "log_every": 10},
        sample={"num_samples": 0},
    )
    result = main(cfg)
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) < 0.8 * sum(first)
    assert result.val_ppl < 0.8 * 300  # well below a uniform guess over the vocabulary


class Killed(Exception):
    pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """2k steps straight == k steps, killed, resumed, k more: identical losses and weights (CPU, fp32)."""
    import dlm.train.loop as loop

    train = {"max_steps": 8, "save_every": 4, "eval_every": 4, "ema_decay": 0.9}
    cfg_a = tiny_recipe(
        tmp_path / "a", train={**train, "output_dir": str(tmp_path / "a/run")}, sample={"num_samples": 0}
    )
    cfg_b = tiny_recipe(
        tmp_path / "b", train={**train, "output_dir": str(tmp_path / "b/run")}, sample={"num_samples": 0}
    )
    straight = main(cfg_a)

    real_save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if path.name == "checkpoint-4":
            raise Killed  # the process dies right after its step-4 checkpoint
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(cfg_b)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = main(cfg_b)  # same recipe; train.resume=auto picks up checkpoint-4
    assert resumed.final_step == 8 and len(resumed.losses) == 4
    a, b = losses(tmp_path / "a/run"), losses(tmp_path / "b/run")
    assert a == b  # bitwise: same batches, same noise, same optimizer and scheduler state
    wa, wb = weights(straight.model), weights(resumed.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ema_a = load_file(tmp_path / "a/run/checkpoint-8/ema.safetensors")
    ema_b = load_file(tmp_path / "b/run/checkpoint-8/ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert straight.val_ppl == resumed.val_ppl


def test_fresh_run_refuses_to_overwrite_checkpoints(tmp_path):
    cfg = tiny_recipe(tmp_path, sample={"num_samples": 0})
    main(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoint-6.*train.resume=auto"):
        main(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="never")))


def test_missing_checkpoints_are_clear_errors(tmp_path):
    cfg = tiny_recipe(tmp_path, sample={"num_samples": 0}, train={"resume": str(tmp_path / "no-such-checkpoint")})
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        main(cfg)
    cfg = tiny_recipe(tmp_path, sample={"num_samples": 0}, model={"init_from": str(tmp_path / "no-model")})
    with pytest.raises(ConfigError, match="model.init_from: .*no-model"):
        main(cfg)


def test_pretrained_model_with_its_tokenizer_and_with_another_mask_token(tmp_path):
    from transformers import AutoTokenizer

    first = main(tiny_recipe(tmp_path / "a", sample={"num_samples": 0}))
    final = str(first.output_dir / "final")
    ok = main(
        tiny_recipe(
            tmp_path / "b", sample={"num_samples": 0}, tokenizer={"name_or_path": final}, model={"init_from": final}
        )
    )  # continue training from the exported model
    assert ok.model.config.mask_token_id == first.model.config.mask_token_id
    tok = AutoTokenizer.from_pretrained(final)
    tok.add_special_tokens({"additional_special_tokens": ["<|x|>"]})
    tok.mask_token = "<|x|>"  # a tokenizer whose mask token is not the one the model learned
    tok.save_pretrained(tmp_path / "other-tok")
    cfg = tiny_recipe(
        tmp_path / "c",
        sample={"num_samples": 0},
        tokenizer={"name_or_path": str(tmp_path / "other-tok")},
        model={"init_from": final},
    )
    with pytest.raises(ConfigError, match="trained with mask_token_id=.* but the tokenizer's mask token is"):
        main(cfg)


class NaNAfter(MDLMObjective):
    """MDLM whose loss turns NaN from the 4th training call on (validation calls excluded)."""

    name = "nan_after_3"
    calls = 0

    def loss(self, model, batch, noise):
        out = super().loss(model, batch, noise)
        if model.training:
            type(self).calls += 1
            if type(self).calls >= 4:
                return LossOutput(out.total * float("nan"), out.count)
        return out


if "nan_after_3" not in OBJECTIVES:
    OBJECTIVES.register("nan_after_3")(lambda **kw: NaNAfter(**kw))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    NaNAfter.calls = 0
    cfg = tiny_recipe(
        tmp_path, objective="nan_after_3", train={"save_every": 2, "eval_every": 2}, sample={"num_samples": 0}
    )
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 4.*checkpoint-2 \(step 2\)"):
        main(cfg)
    run = Path(cfg.train.output_dir)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    ckpt = load_file(run / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in ckpt.values())


def test_incomplete_checkpoint_is_ignored(tmp_path):
    cfg = tiny_recipe(tmp_path, sample={"num_samples": 0})
    main(cfg)
    run = Path(cfg.train.output_dir)
    broken = run / "checkpoint-99"
    shutil.copytree(run / "checkpoint-6", broken)
    (broken / "trainer_state.json").unlink()  # as if the process died before the rename
    assert list_checkpoints(run)[-1].name == "checkpoint-6"


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    cfg = tiny_recipe(tmp_path, sample={"num_samples": 0})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    two, one = tmp_path / "two", tmp_path / "one"
    run_script("dist_train.py", recipe, f"train.output_dir={two}", "train.micro_batch_size=2", processes=2)
    run_script("dist_train.py", recipe, f"train.output_dir={one}", "train.micro_batch_size=4")
    r0, r1, single = (
        load_file(p) for p in (two / "rank0.safetensors", two / "rank1.safetensors", one / "rank0.safetensors")
    )
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the ranks hold identical weights
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], atol=1e-5, rtol=1e-4)
    l2, l1 = losses(two), losses(one)
    assert l2.keys() == l1.keys() and all(abs(l2[s] - l1[s]) < 1e-4 for s in l1)


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    assert "train" in capsys.readouterr().out
    assert cli_main(["train", "quickstart", "optim.lrr=1"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err
    assert cli_main(["generate", str(tmp_path / "nothing")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_cli_train_then_generate(tmp_path, capsys):
    cfg = tiny_recipe(tmp_path, sample={"num_samples": 0})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert cli_main(["train", str(recipe), "train.max_steps=3"]) == 0
    assert (Path(cfg.train.output_dir) / "final" / "model.safetensors").is_file()
    capsys.readouterr()
    assert (
        cli_main(
            [
                "generate",
                cfg.train.output_dir,
                "--prompt",
                "the model",
                "--prompt",
                "def",
                "--gen-length",
                "8",
                "--steps",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "=== 'the model'" in out and "=== 'def'" in out


def test_python_dash_m_dlm_train(tmp_path):
    cfg = tiny_recipe(tmp_path, sample={"num_samples": 0})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    res = subprocess.run(
        [sys.executable, "-m", "dlm.train", str(recipe), "train.max_steps=2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (Path(cfg.train.output_dir) / "checkpoint-2").is_dir()


def test_console_script_is_installed():
    exe = shutil.which("dlm")
    assert exe is not None, "pip install -e . should put a 'dlm' console script on PATH"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "generate" in res.stdout


def test_sft_on_chat_data_end_to_end(tmp_path):
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(200):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"prompt": f"{a} plus {b} is", "response": f" {a + b}"})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_recipe(
        tmp_path,
        objective="sft",
        data={"dataset": str(path), "format": "chat", "seq_len": 16},
        sample={"num_samples": 0},
    )
    result = main(cfg)
    assert result.bound == "nelbo" and result.val_ppl > 1 and len(result.losses) == 6


def log_records(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_log(run / "log.jsonl") if key in r}


def test_grad_accum_equals_the_unaccumulated_global_batch(tmp_path):
    """micro-batch 4 × accum 2 == micro-batch 8 × accum 1: the same global batch and noise, so the
    same per-step loss and gradient norm (rel 1e-5: a mis-scaled accumulated gradient shows here even
    where AdamW's scale invariance would hide it in the weights) and final weights (atol 1e-5, rtol
    1e-4) — equal up to float32 summation order."""
    runs, updates = {}, {}
    real_adamw = torch.optim.AdamW

    class CountingAdamW(real_adamw):  # counts the updates that reach the weights
        def step(self, closure=None):
            updates[accum] = updates.get(accum, 0) + 1
            return super().step(closure)

    torch.optim.AdamW = CountingAdamW
    try:
        for micro, accum in ((4, 2), (8, 1)):
            train = {"micro_batch_size": micro, "grad_accum": accum, "max_steps": 4, "save_every": 4, "eval_every": 4}
            cfg = tiny_recipe(
                tmp_path, train={**train, "output_dir": str(tmp_path / f"accum{accum}")}, sample={"num_samples": 0}
            )
            runs[accum] = main(cfg)
    finally:
        torch.optim.AdamW = real_adamw
    assert updates == {2: 4, 1: 4}  # one optimizer step per global batch, however it is accumulated
    a, b = tmp_path / "accum2", tmp_path / "accum1"
    for key in ("loss", "grad_norm"):
        la, lb = log_records(a, key), log_records(b, key)
        assert la.keys() == lb.keys() == {1, 2, 3, 4}
        for step in lb:
            assert la[step] == pytest.approx(lb[step], rel=1e-5), (key, step)
    wa, wb = weights(runs[2].model), weights(runs[1].model)
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    assert runs[2].val_ppl == pytest.approx(runs[1].val_ppl, rel=1e-4)


def spy_on_model(monkeypatch, attach) -> None:
    """Call ``attach(model)`` on the model the training loop builds (to register hooks)."""
    import dlm.train.loop as loop

    real = loop.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        attach(model)
        return model

    monkeypatch.setattr(loop, "build_model", build)


def test_gradient_checkpointing_recomputes_the_layers_in_backward(tmp_path, monkeypatch):
    """``model.gradient_checkpointing: true``: every layer's forward runs a second time inside the
    backward pass (and only then), and the run trains exactly as without it."""
    in_backward = [False]
    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        in_backward[0] = True
        try:
            return real_backward(self, *args, **kwargs)
        finally:
            in_backward[0] = False

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    calls = []  # (layer, in backward) of every training-mode layer forward of the current run

    def attach(model):
        for i, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(
                lambda mod, args, i=i: calls.append((i, in_backward[0])) if mod.training else None
            )

    spy_on_model(monkeypatch, attach)
    runs = {}
    for ckpt in (False, True):
        calls.clear()
        train = {"max_steps": 2, "save_every": 2, "eval_every": 2, "output_dir": str(tmp_path / f"ckpt-{ckpt}")}
        cfg = tiny_recipe(tmp_path, model={"gradient_checkpointing": ckpt}, train=train, sample={"num_samples": 0})
        runs[ckpt] = (main(cfg), list(calls))
    (plain, plain_calls), (ckpt, ckpt_calls) = runs[False], runs[True]
    forward = [(i, False) for _ in range(2) for i in range(2)]  # 2 steps x 2 layers
    assert plain_calls == forward
    recomputed = [c for c in ckpt_calls if c[1]]
    assert [c for c in ckpt_calls if not c[1]] == forward and sorted(recomputed) == sorted(
        (i, True) for i, _ in forward
    )
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    for k, v in weights(plain.model).items():
        torch.testing.assert_close(weights(ckpt.model)[k], v)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_bf16_mixed_precision_runs_the_forward_in_bfloat16(tmp_path, monkeypatch, precision, dtype):
    """``train.mixed_precision: bf16``: a Linear's output inside the model's forward is bfloat16
    (CPU autocast) in training and validation steps; ``no`` keeps float32."""
    seen = []

    def attach(model):
        linear = model.layers[0].mlp.down_proj
        linear.register_forward_hook(lambda mod, args, out: seen.append((mod.training, out.dtype)))

    spy_on_model(monkeypatch, attach)
    train = {"mixed_precision": precision, "max_steps": 1, "save_every": 1, "eval_every": 1}
    result = main(tiny_recipe(tmp_path, train=train, sample={"num_samples": 0}))
    assert {training for training, _ in seen} == {True, False}  # training and validation forwards
    assert {d for _, d in seen} == {dtype}
    assert all(math.isfinite(x) for x in result.losses)
    assert next(result.model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_keep_checkpoints_keeps_exactly_the_newest_n(tmp_path, monkeypatch):
    import dlm.train.loop as loop

    real_save = loop.save_checkpoint
    after_each = []

    def save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        after_each.append([p.name for p in list_checkpoints(path.parent)])
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save)
    train = {"max_steps": 5, "save_every": 1, "eval_every": 5, "keep_checkpoints": 3}
    cfg = tiny_recipe(tmp_path, train=train, sample={"num_samples": 0})
    main(cfg)
    newest = lambda s: [f"checkpoint-{i}" for i in range(max(1, s - 2), s + 1)]  # noqa: E731
    assert after_each == [newest(s) for s in range(1, 6)]
    run = Path(cfg.train.output_dir)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == newest(5)  # nothing else left


def test_ema_weights_are_validated_and_exported(tmp_path, monkeypatch):
    """``train.ema_decay > 0``: validation runs on the EMA shadow and ``final/`` holds it, while the
    raw weights keep training (the returned model and checkpoints hold the raw weights)."""
    import dlm.train.loop as loop

    real_evaluate = loop.evaluate
    evaluated = []

    def evaluate(model, *args, **kwargs):
        evaluated.append({k: v.detach().clone() for k, v in getattr(model, "module", model).named_parameters()})
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    train = {"max_steps": 4, "save_every": 2, "eval_every": 2, "ema_decay": 0.5}
    cfg = tiny_recipe(tmp_path, train=train, sample={"num_samples": 0})
    result = main(cfg)
    run = Path(cfg.train.output_dir)
    assert len(evaluated) == 2  # steps 2 and 4
    for at, seen in zip((2, 4), evaluated):
        ema = load_file(run / f"checkpoint-{at}" / "ema.safetensors")
        raw = load_file(run / f"checkpoint-{at}" / "model.safetensors")
        assert ema.keys() == seen.keys()
        assert all(torch.equal(seen[k], ema[k]) for k in ema)  # validated with the EMA weights
        assert any(not torch.equal(raw[k], ema[k]) for k in ema)  # which are not the raw weights
    final = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(final[k], ema[k]) for k in ema)
    assert all(torch.equal(v, raw[k]) for k, v in weights(result.model).items() if k in raw)  # swapped back
    assert result.val_ppl == log_records(run, "val_ppl")[4]  # the reported bound is the EMA model's


def test_curves_label_the_final_validation_value(tmp_path, monkeypatch):
    import json

    import dlm.train.plot as plot

    log = tmp_path / "log.jsonl"
    records = [{"step": 10, "loss": 3.0}, {"step": 10, "val_ppl": 40.0, "bound": "nelbo"}, {"step": 20, "loss": 2.5},
               {"step": 20, "val_ppl": 12.345, "bound": "nelbo"}]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, path, dpi: figures.append(fig) or path)
    plot.plot_curves(log, tmp_path / "curves.png")
    val = figures[0].axes[1]
    assert val.get_title() == "validation NELBO perplexity bound — final 12.35 at step 20"
    assert [t.get_text() for t in val.texts] == ["12.35"]
