"""``dlm tune``: the sweep, its Pareto front and AUP, the chosen preset and ``--preset`` loading."""

import dataclasses
import json

import pytest
import yaml

from conftest import REPEAT_SFT, tiny_recipe
from dlm.cli import main as cli_main


@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = tiny_recipe(
        tmp, objective="sft", data=REPEAT_SFT, sample={"num_samples": 0},
        train={"max_steps": 2, "save_every": 2, "eval_every": 2},
    )  # fmt: skip
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert cli_main(["train", str(recipe)]) == 0
    return cfg.train.output_dir


def tune(ckpt, out, *extra):
    argv = ["tune", ckpt, "--task", "repeat", "--task-args", "period=4,repeats=2", "--prompts", "4"]
    argv += ["--gen-length", "8", "--thresholds", "0.05,0.9", "--caches", "none,dual", "--open-next-at", "1,0"]
    return cli_main([*argv, "--max-open-blocks", "2", "--out", str(out), *extra])


def test_tune_sweeps_draws_the_front_and_writes_a_preset_that_reproduces_its_figure(task_model, tmp_path, capsys):
    from dlm.decode.presets import load_preset
    from dlm.eval.tune import Result, area_under_pareto, choose, pareto, run_setting

    assert tune(task_model, tmp_path / "a", "--block-lengths", "4,3") == 0
    data = json.loads((tmp_path / "a" / "tune.json").read_text())
    assert (tmp_path / "a" / "pareto.png").stat().st_size > 0
    assert len(data["results"]) == 2 * 2 * 2  # thresholds × caches × open_next_at at block 4
    assert {s["why"] for s in data["skipped"]} == {"block_length 3 does not divide gen_length 8"}
    assert data["versions"]["torch"] and data["dtype"] == "float32" and data["device"] == "cpu"
    results = [Result(**r) for r in [data["reference"], *data["results"]]]
    front = pareto(results)
    assert [vars(r) for r in front] == data["pareto"]
    for r in front:  # nothing beats a front point on both axes
        assert not any(o.score >= r.score and o.tpf > r.tpf for o in results)
    assert data["aup"] == pytest.approx(area_under_pareto(front))
    chosen, ref = data["chosen"], data["reference"]
    assert chosen["score"] >= ref["score"] - 0.01
    assert vars(choose(results[1:], results[0], 0.01)) == chosen  # the rule below, on the recorded figures
    assert "chosen (the fastest within 0.01" in capsys.readouterr().out
    # the preset holds the chosen setting, and decoding with it gives the same figures
    name, settings = load_preset(tmp_path / "a" / "preset.yaml")
    assert name == "confidence" and settings == chosen["settings"]
    from dlm.data import encode_prompts
    from dlm.loading import load
    from dlm.tasks import generate

    model, tok, _ = load(task_model)
    examples = generate("repeat", 4, seed=1, period=4, repeats=2)
    prompt, pad = encode_prompts(tok, [e["prompt"] for e in examples])
    again = run_setting(model, tok, "repeat", examples, prompt, pad, settings, 0)
    assert (again.score, again.nfe) == (chosen["score"], chosen["nfe"])
    # the same sweep again: the same scores and NFE, the same choice
    assert tune(task_model, tmp_path / "b", "--block-lengths", "4,3") == 0
    second = json.loads((tmp_path / "b" / "tune.json").read_text())
    assert [(r["score"], r["nfe"]) for r in second["results"]] == [(r["score"], r["nfe"]) for r in data["results"]]
    assert [r["settings"] for r in second["pareto"]] == [r["settings"] for r in data["pareto"]]
    # the CLI reads the preset; options given win over it
    assert cli_main(["generate", task_model, "--preset", str(tmp_path / "a" / "preset.yaml"), "--prompt", "a"]) == 0
    from dlm.eval.harness import DLMEvalModel

    lm = DLMEvalModel(pretrained=task_model, preset=str(tmp_path / "a" / "preset.yaml"), cache="none")
    assert lm.decoder == "confidence" and lm.gen_length == 8
    assert lm.decoder_settings == {**{k: v for k, v in settings.items() if k != "gen_length"}, "cache": "none"}


def test_rl_rollouts_read_a_decode_preset(tmp_path):
    from dlm.decode.presets import write_preset
    from dlm.train.rl.loop import make_decoder

    path = write_preset(tmp_path / "p.yaml", "confidence", {"gen_length": 8, "steps": 8, "block_length": 4,
                                                             "rule": "threshold", "threshold": 0.7})  # fmt: skip
    dec = make_decoder({"preset": str(path), "threshold": 0.5})
    assert (dec.gen_length, dec.block_length, dec.rule, dec.threshold) == (8, 4, "threshold", 0.5)
    assert make_decoder({"preset": str(path)}, greedy=True).temperature == 0.0


def test_bad_presets_and_grids_are_clear_errors(task_model, tmp_path, capsys):
    from dlm.decode.presets import PresetError, load_preset

    bad = tmp_path / "bad.yaml"
    bad.write_text("decoder: confidence\ngen_length: 8\nblock_length: 3\n")
    with pytest.raises(PresetError, match=r"bad.yaml: block_length=3 does not divide gen_length=8"):
        load_preset(bad)
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(PresetError, match="a `decoder:` key"):
        load_preset(tmp_path / "list.yaml")
    exact = tmp_path / "exact.yaml"
    exact.write_text("decoder: confidence\ngen_length: 8\nsteps: 8\ncache: exact\n")  # the model is bidirectional
    assert cli_main(["generate", task_model, "--preset", str(exact), "--prompt", "a"]) == 2
    assert "cache='exact' needs a block-causal" in capsys.readouterr().err
    assert cli_main(["generate", task_model, "--preset", str(exact), "--decoder", "ancestral"]) == 2
    assert "is for 'confidence'" in capsys.readouterr().err
    assert cli_main(["tune", task_model, "--task", "repeet", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'repeet'" in capsys.readouterr().err
    assert tune(task_model, tmp_path / "none", "--block-lengths", "3", "--caches", "exact") == 2
    err = capsys.readouterr().err
    assert "no valid setting in the grid" in err and "block_length 3 does not divide gen_length 8" in err


def test_front_area_and_choice_on_known_points():
    from dlm.eval.tune import Result, area_under_pareto, choose, pareto

    def r(score, tpf, cache="none"):
        return Result({"cache": cache}, score, 8 / tpf, tpf, 1.0, 10.0)

    ref = r(0.90, 1.0)
    pts = [ref, r(0.92, 2.0), r(0.80, 4.0), r(0.85, 4.0, "dual"), r(0.50, 8.0), r(0.40, 8.0), r(0.91, 2.0, "dual")]
    front = pareto(pts)
    assert [(p.score, p.tpf) for p in front] == [(0.92, 2.0), (0.85, 4.0), (0.50, 8.0)]
    # best score reachable at TPF >= x: 0.92 on [1, 2], 0.85 on (2, 4], 0.50 on (4, 8]
    assert area_under_pareto(front) == pytest.approx(0.92 * 1 + 0.85 * 2 + 0.50 * 4)
    assert choose(pts[1:], ref, 0.01) is pts[1]  # 0.92 at TPF 2; 0.85 at TPF 4 is 0.05 below the reference
    assert choose(pts[2:6], ref, 0.01) is ref  # nothing in the grid holds the score: decode one token per step
    assert choose(pts[1:], ref, 0.06) is pts[3]  # within 0.06: TPF 4, the better of the two there
    tie = [r(0.9, 4.0, "none"), r(0.9, 4.0, "dual")]
    assert choose(tie, ref, 0.0) is tie[1]  # equal speed and TPF: the cache that feeds less
    fast = Result({"cache": "dual"}, 0.9, 4.0, 2.0, 1.0, 100.0)  # fewer tokens per forward but 10x the tokens/s
    assert choose([*tie, fast], ref, 0.0) is fast
    close = Result({"cache": "none"}, 0.9, 1.0, 8.0, 1.0, 96.0)  # within 5% of the fastest: TPF decides
    assert choose([*tie, fast, close], ref, 0.0) is close
