"""Compiled decoding (``compile``): the trunk under ``torch.compile`` over static caches and bucketed
shapes gives the tokens uncompiled decoding gives, with a bounded number of graphs.

Most tests compile with dynamo's ``eager`` backend: it traces the whole trunk as one graph (a graph
break fails: ``fullgraph``) and runs it op by op, so any difference from uncompiled decoding comes from
dlm's static caches and padded shapes. One test compiles with inductor, the default, whose fused
kernels may reassociate floating point: greedy tokens must still agree.
"""

import math
import warnings

import pytest
import torch

from conftest import tiny_model
from dlm.decode import build_decoder
from dlm.decode.compiled import bucket, compiled_forward, default_mode
from dlm.model import KVCache

MASK = 63


def sharp_model(**kw):
    """A tiny random model in float64, with sharpened logits (several positions pass the threshold per
    step). A random tiny model's confidences come in near-ties that a last-bit difference flips (the
    bucketed attention sums over more, masked, slots); in float64 the comparison is about dlm's logic."""
    model = tiny_model(**kw).double()
    with torch.no_grad():
        model.norm.weight.mul_(5.0)
    return model


def decode(model, prompt, pad=None, **kw):
    settings = dict(gen_length=16, steps=16, block_length=8, rule="threshold", threshold=0.3, temperature=0.0)
    decoder = build_decoder("confidence", eos_token_id=None, **{**settings, **kw})
    return decoder(model, prompt, attention_mask=pad)


def assert_same(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step_map, b.step_map)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.equal(a.nfe, b.nfe)


def test_buckets_cover_every_length_with_at_most_a_quarter_of_padding_and_few_sizes():
    for limit in (23, 100, 1280):
        sizes = [bucket(n, limit) for n in range(1, limit + 1)]
        assert all(n <= s <= limit for n, s in zip(range(1, limit + 1), sizes))
        assert sizes == sorted(sizes) and sizes[-1] == limit
        assert all(s <= max(8, math.ceil(1.25 * n)) for n, s in zip(range(1, limit + 1), sizes))
        assert len(set(sizes)) <= 4 * math.log2(limit / 8) + 2


CASES = [  # (model settings, cache)
    ({}, "none"),
    ({}, "prefix"),
    ({}, "dual"),
    ({}, "delayed"),
    ({"attention_mode": "block_causal", "block_size": 8}, "exact"),
    ({"attention_mode": "block_causal", "block_size": 8}, "dual"),
    ({"logits_shift": True}, "dual"),
    ({"logits_shift": True}, "delayed"),
]


@pytest.mark.parametrize("model_kw,cache", CASES, ids=[f"{c}-{'-'.join(k) or 'bidirectional'}" for k, c in CASES])
def test_compiled_decoding_gives_the_uncompiled_tokens_with_every_cache(model_kw, cache):
    model = sharp_model(**model_kw)
    prompt = torch.randint(0, MASK, (3, 7), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(prompt)
    pad[1, :3] = 0  # a left-padded row: the padding mask is extended over the bucketed slots
    plain = decode(model, prompt, pad, cache=cache, refresh_every=3)
    compiled = decode(model, prompt, pad, cache=cache, refresh_every=3, compile="eager")
    assert_same(compiled, plain)
    forward = compiled_forward(model, "eager")
    assert forward.failed is None and forward.shapes  # the compiled trunk ran: no silent fallback


def test_an_unpadded_canvas_without_a_cache_compiles_maskless_at_its_own_length():
    model = sharp_model()
    prompt = torch.randint(0, MASK, (3, 7), generator=torch.Generator().manual_seed(6))
    assert_same(decode(model, prompt, compile="eager"), decode(model, prompt))
    assert compiled_forward(model, "eager").shapes == {(3, 23)}  # the canvas itself, no scratch cache


def test_compiled_pipelined_decoding_and_guidance_give_the_uncompiled_tokens():
    model = sharp_model()
    prompt = torch.randint(0, MASK, (2, 7), generator=torch.Generator().manual_seed(1))
    for kw in ({"open_next_at": 0.0, "max_open_blocks": 2}, {"cfg_scale": 1.0}):
        assert_same(
            decode(model, prompt, cache="dual", compile="eager", **kw), decode(model, prompt, cache="dual", **kw)
        )


def test_a_decode_compiles_one_graph_per_bucket_and_prompt_lengths_share_them():
    model = sharp_model()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward

    for length in (7, 9, 11):  # canvases of 23, 25 and 27 columns: caches of 24, 28 and 28 slots
        prompt = torch.randint(0, MASK, (2, length), generator=torch.Generator().manual_seed(length))
        assert_same(decode(model, prompt, cache="dual", compile=counting), decode(model, prompt, cache="dual"))
    forward = compiled_forward(model, counting)
    # the dual cache feeds the block (8 columns) or, at a block start, the whole canvas padded to the cache
    assert sorted(forward.shapes) == [(2, 8, 24), (2, 8, 28), (2, 24, 24), (2, 28, 28)]
    assert len(graphs) == len(forward.shapes)  # one graph per shape, none broken into pieces


def test_inductor_compiled_decoding_gives_the_uncompiled_greedy_tokens():
    model = sharp_model()
    prompt = torch.randint(0, MASK, (2, 7), generator=torch.Generator().manual_seed(2))
    plain = decode(model, prompt, gen_length=8, steps=8)
    compiled = decode(model, prompt, gen_length=8, steps=8, compile=True)
    assert torch.equal(compiled.tokens, plain.tokens) and torch.equal(compiled.step_map, plain.step_map)
    forward = compiled_forward(model)
    assert forward.failed is None and forward.mode == "default"  # CPU: inductor without CUDA graphs
    assert default_mode(torch.device("cuda", 0)) == "reduce-overhead"  # CUDA: captured as CUDA graphs


def test_a_backend_that_fails_warns_once_and_decoding_continues_uncompiled():
    model = sharp_model()
    prompt = torch.randint(0, MASK, (2, 7), generator=torch.Generator().manual_seed(3))

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found.*continues uncompiled"):
        first = decode(model, prompt, cache="dual", compile=broken)
    assert_same(first, decode(model, prompt, cache="dual"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later decodes run uncompiled without a word
        decode(model, prompt, cache="dual", compile=broken)


def test_an_error_of_the_call_itself_is_raised_not_taken_for_a_compile_failure():
    model = sharp_model()
    forward = compiled_forward(model, "eager")
    with pytest.raises(ValueError, match="cache slots must lie in"):
        cache, _lease = forward.lend(1, 16)
        forward(input_ids=torch.zeros(1, 4, dtype=torch.long), cache=cache, cache_slots=torch.full((1, 4), 99))
    assert forward.failed is None


def test_a_models_without_dlms_cache_support_is_compiled_whole():
    from test_decoders import Plain

    model = Plain(sharp_model())
    prompt = torch.randint(0, MASK, (2, 7), generator=torch.Generator().manual_seed(4))
    assert_same(decode(model, prompt, compile="eager"), decode(model, prompt))
    assert compiled_forward(model, "eager").whole


def test_static_caches_are_lent_per_decode_and_reused_once_it_is_over():
    model = sharp_model()
    forward = compiled_forward(model, "aot_eager")
    first, lease = forward.lend(2, 23)
    second, lease2 = forward.lend(2, 23)  # the first is still held: another one
    assert first is not second and first.max_len == 24 and first.static
    del lease
    third, _ = forward.lend(2, 25)  # 25 columns share the 28-slot bucket, not the 24-slot one
    again, _ = forward.lend(2, 20)  # a 20-column canvas: the 20-slot bucket
    assert third.max_len == 28 and again.max_len == 20
    first.valid[:, :5] = True
    reused, _ = forward.lend(2, 23)
    assert reused is first and not reused.valid.any()  # returned empty
    del lease2


def test_a_static_cache_reindexes_in_place_like_a_dynamic_one():
    static, dynamic = KVCache(2, 3, 8, 2, 4), KVCache(2, 3, 8, 2, 4)
    for cache in (static, dynamic):
        torch.manual_seed(0)
        for k, v in zip(cache.keys, cache.values):
            k.normal_(), v.normal_()
        cache.valid[:, :5] = torch.rand(3, 5) > 0.5
    static.make_static()
    addresses = [k.data_ptr() for k in static.keys]
    index = torch.tensor([2, 2, 0])
    static.reindex(index), dynamic.reindex(index)
    assert [k.data_ptr() for k in static.keys] == addresses
    assert all(torch.equal(a, b) for a, b in zip(static.keys + static.values, dynamic.keys + dynamic.values))
    assert torch.equal(static.valid, dynamic.valid)


def test_an_unknown_compile_backend_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="compile='inductr' is not a torch.compile backend.*inductor"):
        build_decoder("confidence", gen_length=8, steps=8, compile="inductr")


def test_a_lora_model_decodes_compiled_through_its_base_model_with_the_adapters_on():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(sharp_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.double()
    prompt = torch.randint(0, MASK, (2, 7), generator=torch.Generator().manual_seed(5))
    plain = decode(model, prompt, cache="dual")
    assert_same(decode(model, prompt, cache="dual", compile="eager"), plain)
    with model.disable_adapter():  # the adapters change the tokens: the compiled run really used them
        assert not torch.equal(decode(model, prompt, cache="dual").tokens, plain.tokens)
