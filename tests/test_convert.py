"""Published checkpoints on dlm's backbone: logit parity of ``dlm convert`` for every family against an
independent forward with the same random weights (the transformers classes for Llama / Qwen2 / Qwen3, the
references in ``references.py`` for LLaDA / Dream / SDAR, saved in their own layouts), round trips, sharded
and bf16 sources, caches and RL rows on converted models, the loader, A2D, and the errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import dlm.model  # noqa: F401  (registers the Auto classes)
from conftest import tiny_recipe
from dlm.decode import build_decoder
from dlm.model.convert import ConvertError, convert
from references import reference_logits, write_checkpoint

FAMILY_SHIFT = {"llada": False, "dream": True, "sdar": False}


def ids_and_pad(batch=2, length=20, vocab=93, left=4):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(7))
    pad = torch.ones_like(ids)
    pad[1, :left] = 0  # left padding (a multiple of SDAR's block of 4: blocks stay aligned to position 0)
    return ids, pad


def assert_parity(got_BTV, ref_BTV, shifted: bool, real=None):
    """dlm logits at i equal the source's at i (unshifted) or at i − 1 (shifted), on real positions."""
    if shifted:
        got_BTV, ref_BTV = got_BTV[:, 1:], ref_BTV[:, :-1]
        real = None if real is None else real[:, 1:] & real[:, :-1]
    if real is not None:
        got_BTV, ref_BTV = got_BTV[real], ref_BTV[real]
    torch.testing.assert_close(got_BTV, ref_BTV, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
@pytest.mark.parametrize("shards", [1, 3])
def test_published_diffusion_families_convert_with_logit_parity(tmp_path, family, shards):
    write_checkpoint(family, tmp_path / "src", shards=shards)
    out = convert(tmp_path / "src", tmp_path / "dlm")
    model = AutoModel.from_pretrained(out).eval()  # round trip: saved, then loaded by transformers
    cfg = model.config
    assert cfg.logits_shift is FAMILY_SHIFT[family] and cfg.mask_token_id == 95
    assert cfg.attention_mode == ("block_causal" if family == "sdar" else "bidirectional")
    ids, pad = ids_and_pad()
    with torch.no_grad():
        assert_parity(model(ids).logits, reference_logits(family, tmp_path / "src", ids), FAMILY_SHIFT[family])
        got, ref = model(ids, attention_mask=pad).logits, reference_logits(family, tmp_path / "src", ids, pad)
    assert_parity(got, ref, FAMILY_SHIFT[family], real=pad.bool())


def hf_ar(name: str, tie: bool, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[name]
    sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = config_cls(
        **{**sizes, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": tie, **extra}
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def save_with_tokenizer(model, path, vocab=92):
    """An AR checkpoint with a tokenizer that has no mask token (``vocab`` entries)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(path)
    words = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab - 1)}, "<|eos|>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", unk_token="<unk>").save_pretrained(path)


ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 5e5},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e4},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
}  # fmt: skip


@pytest.mark.parametrize(
    "name, tie, extra",
    [
        ("llama", False, {}),
        ("llama", True, {"rope_parameters": ROPES["llama3"], "attention_bias": True}),
        ("llama", False, {"rope_parameters": ROPES["yarn"]}),
        ("llama", False, {"rope_parameters": ROPES["dynamic"], "max_position_embeddings": 16}),
        ("qwen2", True, {}),
        ("qwen3", False, {"head_dim": 16}),
    ],
)
def test_ar_families_convert_with_identical_next_token_likelihood(tmp_path, name, tie, extra):
    source = hf_ar(name, tie, **extra)
    save_with_tokenizer(source, tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "dlm")
    model = AutoModel.from_pretrained(out).eval()
    assert model.config.attention_mode == "causal" and model.config.logits_shift
    tok = AutoTokenizer.from_pretrained(out)  # a mask token was added to the tokenizer, in a spare row
    assert tok.mask_token == "<|mask|>" and model.config.mask_token_id == tok.mask_token_id < 96
    assert model.config.vocab_size == 96
    ids, pad = ids_and_pad(length=24)  # beyond the dynamic-NTK source's 16 positions: its scaling is on
    with torch.no_grad():
        ref = source(ids).logits
        got = model(ids).logits[..., : ref.shape[-1]]
        assert_parity(got, ref, shifted=True)
        assert_parity(model(ids, attention_mask=pad).logits, source(ids, attention_mask=pad).logits, True, pad.bool())
    from dlm.eval.quality import causal_nll

    rows = ids.tolist()
    nll, n = causal_nll(model, rows)
    logp = torch.log_softmax(ref[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])
    assert n == ids[:, 1:].numel() and nll == pytest.approx(-float(logp.sum()), rel=1e-5)


def test_a_source_without_spare_rows_grows_its_embeddings_for_the_mask_token(tmp_path):
    source = hf_ar("qwen3", False, head_dim=8)
    save_with_tokenizer(source, tmp_path / "src", vocab=96)  # the tokenizer fills every row
    model = AutoModel.from_pretrained(convert(tmp_path / "src", tmp_path / "dlm")).eval()
    mask = model.config.mask_token_id
    assert mask >= 96 and model.config.vocab_size == 128  # grown, rounded up to a multiple of 64
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[mask], source.get_input_embeddings().weight.mean(0))
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():  # the old rows' logits are unchanged
        assert_parity(model(ids).logits[..., :96], source(ids).logits, shifted=True)


def test_bf16_source_stays_bf16_and_output_shards_with_an_index(tmp_path):
    write_checkpoint("llada", tmp_path / "src", dtype=torch.bfloat16)
    out = convert(tmp_path / "src", tmp_path / "dlm", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = AutoModel.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    f32 = convert(tmp_path / "src", tmp_path / "f32", dtype="float32")
    assert AutoModel.from_pretrained(f32).dtype == torch.float32


def converted_model(tmp_path, family):
    write_checkpoint(family, tmp_path / family)
    return AutoModel.from_pretrained(convert(tmp_path / family, tmp_path / f"{family}-dlm")).eval()


def decode(model, cache, name="confidence", **kw):
    ids, pad = ids_and_pad(batch=3, length=6, left=2)
    pad[2, :4] = 0
    settings = dict(gen_length=16, steps=16, block_length=4, eos_token_id=None, cache=cache, temperature=1.0)
    dec = build_decoder(name, **settings, **kw)
    return dec(model, ids, attention_mask=pad, generator=torch.Generator().manual_seed(0)), pad


def assert_same_decoding(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step_map, b.step_map)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["confidence", "first_hitting"])
def test_caches_on_converted_models(tmp_path, name):
    dream = converted_model(tmp_path, "dream")  # shifted, bidirectional
    none, _ = decode(dream, "none", name)
    assert_same_decoding(decode(dream, "delayed", name, refresh_every=1)[0], none)
    sdar = converted_model(tmp_path, "sdar")  # block-causal
    none, _ = decode(sdar, "none", name)
    for cache in ("exact", "prefix", "dual"):
        assert_same_decoding(decode(sdar, cache, name)[0], none)


def test_trajectory_rows_reproduce_decode_time_log_probs_on_a_converted_shifted_model(tmp_path):
    from dlm.train.rl.estimators import Rollouts, build_rows, token_logprobs

    dream = converted_model(tmp_path, "dream")
    out, pad = decode(dream, "none")
    full_pad = torch.cat([pad, torch.ones(3, 16, dtype=torch.long)], 1)
    r = Rollouts(out.canvas, out.step_map, out.prompt_length, full_pad)
    rows = build_rows("trajectory", r, 95, shrink=1)
    with torch.no_grad():
        logp = token_logprobs(dream, r, rows, 95)
    torch.testing.assert_close(logp[r.trainable].double(), out.logprobs[r.trainable], atol=1e-4, rtol=1e-4)


def test_block_only_head_equals_slicing_the_full_logits_with_the_shift(tmp_path):
    dream = converted_model(tmp_path, "dream")
    ids, pad = ids_and_pad()
    pick = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        full = dream(ids, attention_mask=pad).logits
        torch.testing.assert_close(dream(ids, attention_mask=pad, output_mask=pick).logits, full[pick])


def test_loader_converts_once_and_every_entry_point_takes_a_source_checkpoint(tmp_path, monkeypatch, capsys):
    from dlm.cli import main as cli_main
    from dlm.loading import load

    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    write_checkpoint("dream", tmp_path / "dream")
    model, tok, path = load(tmp_path / "dream")
    assert model.config.model_type == "dlm" and path.parent == tmp_path / "cache" / "converted"
    mtime = (path / "config.json").stat().st_mtime_ns
    assert load(tmp_path / "dream")[2] == path and (path / "config.json").stat().st_mtime_ns == mtime  # cached
    assert cli_main(["generate", str(tmp_path / "dream"), "--prompt", "w1 w2", "--gen-length", "8",
                     "--block-length", "4", "--cache", "dual", "--decoder", "confidence"]) == 0  # fmt: skip
    assert cli_main(["convert", str(tmp_path / "dream"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()


def test_conversion_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    write_checkpoint("llada", tmp_path / "llada")
    cfg = json.loads((tmp_path / "llada" / "config.json").read_text())
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConvertError, match="model_type 'gpt2' is not a family dlm converts; supported: dream"):
        convert(tmp_path / "gpt", tmp_path / "o1")
    from dlm.loading import load

    with pytest.raises(ConvertError, match="is a 'gpt2' checkpoint; .*converts these families: dream, llada, llama"):
        load(tmp_path / "gpt")
    with pytest.raises(ConvertError, match="config.json has no 'num_attention_heads', which the dream layout needs"):
        convert(tmp_path / "llada", tmp_path / "o2", family="dream")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "llada" / "model.safetensors")
    weights["model.transformer.blocks.0.extra.weight"] = weights.pop("model.transformer.blocks.1.up_proj.weight")
    (tmp_path / "broken").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "broken" / f).write_bytes((tmp_path / "llada" / f).read_bytes())
    save_file(weights, tmp_path / "broken" / "model.safetensors")
    with pytest.raises(ConvertError, match="missing \\['layers.1.mlp.up_proj.weight'\\], unexpected "):
        convert(tmp_path / "broken", tmp_path / "o2")
    with pytest.raises(ConvertError, match="--family: unknown model family 'lada'.*Did you mean 'llada'"):
        convert(tmp_path / "llada", tmp_path / "o3", family="lada")
    with pytest.raises(ConvertError, match="mask token id 500 is not in the tokenizer's vocabulary of 96"):
        convert(tmp_path / "llada", tmp_path / "o4", mask_token_id=500)
    (tmp_path / "llada" / "tokenizer.json").unlink()
    with pytest.raises(ConvertError, match="has no tokenizer dlm can load"):
        convert(tmp_path / "llada", tmp_path / "o5")
    with pytest.raises(ConvertError, match="exists and is not empty"):
        convert(tmp_path / "llada", tmp_path / "llada")

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    t0 = time.time()
    with pytest.raises(ConvertError, match="'GSAI-ML/LLaDA-8B-Base' is neither a local checkpoint nor reachable"):
        convert("GSAI-ML/LLaDA-8B-Base", tmp_path / "o6")
    assert time.time() - t0 < 5
    from dlm.cli import main as cli_main

    assert cli_main(["eval", str(tmp_path / "nothere"), "--tasks", "dlm_repeat"]) == 2  # one line, no traceback


@pytest.mark.parametrize("objective, mode", [("mdlm", "bidirectional"), ("bd3lm", "block_causal")])
def test_an_ar_run_adapts_to_diffusion_keeping_its_head_convention(tmp_path, objective, mode):
    from dlm.train.loop import main

    ar = main(tiny_recipe(tmp_path / "ar", objective="ar", sample={"num_samples": 0}))
    assert not ar.model.config.logits_shift
    diffusion = {"block_size": 4} if objective == "bd3lm" else {}
    adapted = main(
        tiny_recipe(
            tmp_path / "a2d",
            objective=objective,
            diffusion=diffusion,
            sample={"num_samples": 0},
            model={"init_from": str(ar.output_dir)},
        )
    )
    config = adapted.model.config
    assert config.logits_shift and config.attention_mode == mode
    first = json.loads((tmp_path / "a2d" / "run" / "log.jsonl").read_text().splitlines()[0])
    assert "loss" in first or "train_loss" in first


@pytest.mark.parametrize("name, billions", [("llada-8b", 8.02), ("dream-7b", 7.62), ("sdar-8b", 8.19)])
def test_bench_shapes_of_published_models_build_on_meta_with_their_sizes(name, billions):
    from dlm.eval.bench_decode import SHAPES
    from dlm.model import DLMModel

    with torch.device("meta"):
        model = DLMModel(SHAPES[name].config(mask_token_id=0))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_ppl_bench_and_eval_take_a_source_checkpoint(tmp_path, monkeypatch):
    from dlm.cli import main as cli_main

    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    write_checkpoint("dream", tmp_path / "dream", max_position_embeddings=512)  # room for the task's answers
    write_checkpoint("sdar", tmp_path / "sdar")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(" ".join(f"w{(7 * i + j) % 90 + 1}" for j in range(40)))
    ppl = tmp_path / "ppl.json"
    args = ["--data", str(docs), "--file-glob", "*.txt", "--seq-len", "16", "--max-rows", "4", "--mc-num", "2"]
    assert cli_main(["ppl", str(tmp_path / "dream"), *args, "--output", str(ppl)]) == 0
    assert json.loads(ppl.read_text())["dataset"]["bound"] is True  # a diffusion model: the NELBO bound
    bench = tmp_path / "bench.json"
    assert (
        cli_main(
            [
                "bench",
                "decode",
                "--checkpoint",
                str(tmp_path / "sdar"),
                "--gen-lengths",
                "8",
                "--block-length",
                "4",
                "--decoders",
                "confidence",
                "--caches",
                "none,exact",
                "--json",
                str(bench),
            ]
        )  # fmt: skip
        == 0
    )
    rows = json.loads(bench.read_text())
    assert {r["cache"] for r in rows["results"]} == {"none", "exact"}
    out = tmp_path / "eval.json"
    assert (
        cli_main(
            [
                "eval",
                str(tmp_path / "dream"),
                "--tasks",
                "dlm_repeat",
                "--limit",
                "2",
                "--gen-length",
                "8",
                "--block-length",
                "4",
                "--cache",
                "dual",
                "--output",
                str(out),
            ]
        )  # fmt: skip
        == 0
    )
    assert out.is_file()


def test_memory_plan_of_a_published_shape_is_built_on_meta(tmp_path):
    from dlm.cli import main as cli_main

    out = tmp_path / "plan.json"
    args = ["bench", "decode", "--shape", "sdar-8b", "--device", "meta", "--dtype", "bfloat16", "--batch-sizes", "8",
            "--gen-lengths", "1024", "--prompt-length", "16", "--json", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    (row,) = json.loads(out.read_text())["plan"]
    assert row["params"] == 8_190_735_360 and row["weights_gb"] == pytest.approx(8_190_735_360 * 2 / 2**30)
    assert row["kv_cache_gb"] == pytest.approx(2 * 36 * 8 * 128 * 2 * 8 * 1040 / 2**30)  # K and V, bf16
