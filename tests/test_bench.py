"""`dlm bench decode` (decoders × caches × lengths × batch sizes) and the generated tasks it scores."""

import dataclasses
import json

import pytest
import yaml

from conftest import REPEAT_SFT, tiny_recipe
from dlm.cli import main as cli_main
from dlm.data import DataConfig, build_data
from dlm.tasks import generate, score
from dlm.tokenizer import TokenizerConfig

TINY = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--vocab-size", "64", "--prompt-length", "4"]


def test_bench_decode_grid_writes_every_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "decode", *TINY, "--gen-lengths", "8,16", "--batch-sizes", "1,2", "--block-length", "8"]
    assert cli_main([*argv, "--decoders", "confidence,threshold", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    # every cache a bidirectional model supports, by default
    assert {r["cache"] for r in rows} == {"none", "prefix", "dual", "delayed"}
    assert len(rows) == 2 * 2 * 2 * 4  # lengths x batches x decoders x caches
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["gen_length"] / r["wall_s"])
        assert 0 <= r["model_s"] <= r["wall_s"] and r["peak_memory_mb"] >= 0
        if r["cache"] == "none":
            assert r["speedup_vs_no_cache"] == pytest.approx(1.0)
        if r["decoder"] == "confidence":
            assert r["nfe"] == r["gen_length"]  # one token per step
    combined = [r for r in rows if r["combined_vs_confidence_no_cache"] is not None]
    assert {r["decoder"] for r in combined} == {"threshold"}
    assert "combined: threshold 0.9 + dual" in capsys.readouterr().out


def test_bench_decode_compile_both_times_each_row_compiled_beside_uncompiled(tmp_path, capsys, monkeypatch):
    import dlm.decode.blocks

    monkeypatch.setattr(dlm.decode.blocks, "backend_of", lambda setting: "eager")  # dynamo's tracing, no inductor
    out = tmp_path / "bench.json"
    argv = ["bench", "decode", *TINY, "--gen-lengths", "16", "--block-length", "8", "--caches", "none,dual"]
    assert cli_main([*argv, "--decoders", "threshold", "--compile", "both", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["cache"], r["compiled"]) for r in rows] == [
        ("none", False),
        ("none", True),
        ("dual", False),
        ("dual", True),
    ]
    for plain, compiled in zip(rows[::2], rows[1::2]):
        assert plain["compile_speedup"] is None and plain["compile_s"] is None
        assert compiled["compile_speedup"] == pytest.approx(plain["wall_s"] / compiled["wall_s"])
        assert compiled["compile_s"] > 0 and compiled["nfe"] == plain["nfe"]
        assert 0 < compiled["model_s"] <= compiled["wall_s"]  # the compiled forward is timed as the model
    assert rows[1]["speedup_vs_no_cache"] == pytest.approx(rows[0]["wall_s"] / rows[1]["wall_s"])
    assert "dual+c" in capsys.readouterr().out


def test_bench_decode_on_a_block_causal_model_includes_the_exact_cache(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "decode", *TINY, "--gen-lengths", "16", "--block-length", "8", "--model-block", "8"]
    assert cli_main([*argv, "--decoders", "first_hitting", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["cache"] for r in rows] == ["none", "exact", "prefix", "dual", "delayed"]
    assert all(r["nfe"] == 16 and r["expected_nfe"] == 16 for r in rows)


def test_bench_decode_rejects_a_cache_the_model_cannot_use(capsys):
    with pytest.raises(SystemExit, match="cache 'exact' is not supported by this model; it supports none, prefix"):
        cli_main(["bench", "decode", *TINY, "--gen-lengths", "8", "--block-length", "8", "--caches", "exact"])


def test_bench_decode_scores_a_task_on_a_checkpoint(tmp_path):
    cfg = tiny_recipe(
        tmp_path,
        objective="sft",
        data=REPEAT_SFT,
        sample={"num_samples": 0},
        train={"max_steps": 2, "save_every": 2, "eval_every": 2},
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert cli_main(["train", str(recipe)]) == 0
    out = tmp_path / "bench.json"
    argv = ["bench", "decode", "--checkpoint", cfg.train.output_dir, "--task", "repeat", "--gen-lengths", "8"]
    argv += ["--task-args", "period=4,repeats=2"]
    argv += ["--block-length", "8", "--decoders", "confidence", "--caches", "none,dual", "--json", str(out)]
    assert cli_main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["cache"] for r in rows] == ["none", "dual"] and all(0 <= r["score"] <= 1 for r in rows)


def test_repeat_task_is_deterministic_and_scored_by_position():
    a, b = generate("repeat", 3, seed=0, period=4, repeats=3), generate("repeat", 3, seed=0, period=4, repeats=3)
    assert a == b and generate("repeat", 3, seed=1, period=4, repeats=3) != a
    ex = a[0]
    assert ex["response"].split() == ex["prompt"].split() * 3
    assert score("repeat", ex, ex["response"]) == 1.0
    assert score("repeat", ex, ex["response"] + " extra words") == 1.0  # only the answer's length is scored
    half = ex["response"].split()[:6]
    assert score("repeat", ex, " ".join(half)) == 0.5


def test_task_errors_list_what_exists():
    with pytest.raises(
        ValueError, match="unknown task 'repeet'; dlm's tasks: repeat; or one of the .*Did you mean 'repeat'"
    ):
        generate("repeet", 2)
    with pytest.raises(ValueError, match="task 'repeat' has no argument.*length; its arguments: period, repeats"):
        generate("repeat", 2, length=3)


def test_generated_task_trains_as_chat_rows():
    cfg = DataConfig(
        dataset="task:repeat", format="chat", task_args={"period": 4, "repeats": 2}, max_documents=40, seq_len=24
    )
    bundle = build_data(cfg, TokenizerConfig(vocab_size=300), seed=0)
    rows = bundle.val
    assert rows["input_ids"].shape[1] == 24 and rows["loss_mask"].sum() > 0


def test_bench_train_writes_the_step_times_it_promises(tmp_path, monkeypatch, capsys):
    import inspect

    import dlm.eval.bench_train as bench_train

    timed = {}  # objective -> what it was timed on: model shape, batch, block size, number of timed steps
    real = bench_train.time_objective

    def time_objective(*args, **kwargs):
        call = inspect.signature(real).bind(*args, **kwargs)
        call.apply_defaults()
        times = real(*args, **kwargs)
        c, a = call.arguments["model"].config, call.arguments
        shape = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size)
        timed[a["name"]] = (shape, tuple(a["batch"]["input_ids"].shape), a["block_size"], len(times))
        return times

    monkeypatch.setattr(bench_train, "time_objective", time_objective)
    out = tmp_path / "bench.json"
    argv = ["bench", "train", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--vocab-size", "64"]
    argv += ["--seq-len", "16", "--batch-size", "2", "--steps", "3", "--warmup", "1", "--block-size", "4"]
    assert cli_main([*argv, "--objectives", "mdlm,bd3lm,ar", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    settings = {k: data["settings"][k] for k in ("hidden_size", "layers", "seq_len", "batch_size", "steps")}
    assert settings == {"hidden_size": 32, "layers": 1, "seq_len": 16, "batch_size": 2, "steps": 3}
    results = data["results"]
    assert list(results) == list(timed) == ["mdlm", "bd3lm", "ar"]
    assert set(timed.values()) == {((32, 1, 2, 64), (2, 16), 4, 3)}  # the asked shape, batch, block and steps
    ar = results["ar"]["median_s"]
    for name, r in results.items():
        assert 0 < r["min_s"] <= r["median_s"] and r["min_s"] <= r["mean_s"]
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["median_s"])
        if name == "ar":
            assert "ratio_to_ar" not in r
        else:
            assert r["ratio_to_ar"] == pytest.approx(r["median_s"] / ar)
    printed = capsys.readouterr().out
    assert "hidden 32, 1 layers, 2 heads, vocab 64" in printed and "bd3lm / ar step time" in printed


def test_memory_plan_arithmetic_and_command(tmp_path, capsys):
    """Per-GPU bytes for P parameters over N GPUs, by hand: DDP 16P; FSDP2 16P/N + two gathered
    bf16 layers; ZeRO-2 2P + 14P/N; ZeRO-3 16P/N + two gathered layers."""
    from dlm.eval.bench_memory import activations, plan

    sizes = {"params": 1000, "layer_params": 100, "hidden": 4, "intermediate": 8, "layers": 2, "vocab": 10}
    act = 7.0
    totals = {e: plan(e, sizes, 4, act).total - act for e in ("ddp", "fsdp2", "zero2", "zero3")}
    assert totals == {"ddp": 16000, "fsdp2": 4000 + 400, "zero2": 2000 + 3500, "zero3": 4000 + 400}
    # 34h + 2i bytes per token per layer, two layers, plus fp32 log-softmax over half the positions
    assert (
        activations(sizes, rows=1, seq=3, checkpointing=False, scored=0.5) == 2 * (34 * 4 + 16) * 3 + 6 * 10 * 3 * 0.5
    )
    assert activations(sizes, 1, 3, True, 0.5) == 2 * 4 * 3 * 2 + (34 * 4 + 16) * 3 + 6 * 10 * 3 * 0.5
    out = tmp_path / "plan.json"
    assert cli_main(["bench", "memory", "recipes/sft-llada-8b.yaml", "--shape", "llada-8b", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8.02B parameters" in printed and "ddp" in printed and "zero3" in printed
    plans = {p["engine"]: p for p in json.loads(out.read_text())["plans"]}
    assert plans["ddp"]["total"] > 80 * 2**30 > plans["fsdp2"]["total"]  # full SFT of 8B: not in DDP, fits sharded
    assert cli_main(["bench", "memory", "recipes/sft-llada-8b.yaml"]) == 2  # a hub start needs --shape
    assert "name its shape with --shape" in capsys.readouterr().err
    assert cli_main(["bench", "memory", "quickstart", "--accelerate-config", "recipes/accelerate/zero2.yaml"]) == 0
    assert "zero2" in capsys.readouterr().out
