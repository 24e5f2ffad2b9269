"""KV caches (docs/caches.md). The exact block cache (and the prefix cache on a block-causal model)
equal no cache token for token; the delayed cache with r = 1 equals no cache; the approximate
caches handle ragged left-padded batches (each row decodes as it would alone) and read back
exactly what a full forward computes while the canvas is unchanged."""

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dlm.decode import build_decoder


def block_model(block: int = 4, shift: bool = False):
    return tiny_model(attention_mode="block_causal", block_size=block, logits_shift=shift)


SHIFT = pytest.mark.parametrize("shift", [False, True], ids=["unshifted", "shifted"])  # logits_shift (Dream, A2D)


class Counting(nn.Module):
    """Counts the tokens fed per call (to show the cache feeds less)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.fed = inner, inner.config, []
        self.supports_output_mask = self.supports_kv_cache = True

    def forward(self, input_ids, **kw):
        self.fed.append(input_ids.shape[1])
        return self.inner(input_ids, **kw)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("confidence", {}),
        ("confidence", {"rule": "threshold", "threshold": 0.05}),
        ("ancestral", {}),
        ("first_hitting", {}),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
@SHIFT
def test_exact_cache_equals_no_cache(name, kw, batch, shift):
    model = block_model(4, shift)
    torch.manual_seed(batch)
    prompt = torch.randint(0, 63, (batch, 6))
    pad = torch.ones(batch, 6, dtype=torch.long)
    if batch > 1:
        pad[1, :3] = 0  # ragged, left-padded prompts
        pad[2, :5] = 0
    outs = {}
    for cache in ("none", "exact"):
        dec = build_decoder(name, gen_length=16, steps=16, block_length=4, eos_token_id=None, cache=cache, **kw)
        outs[cache] = dec(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0))
    assert torch.equal(outs["none"].tokens, outs["exact"].tokens)
    assert torch.equal(outs["none"].step_map, outs["exact"].step_map)
    torch.testing.assert_close(outs["none"].logprobs, outs["exact"].logprobs, atol=1e-4, rtol=1e-4)
    assert torch.equal(outs["none"].nfe, outs["exact"].nfe)
    assert outs["exact"].tokens.shape == (batch, 6 + 16) and torch.equal(outs["exact"].tokens[:, :6], prompt)


def test_exact_cache_feeds_only_the_open_blocks():
    model = Counting(block_model(4))
    dec = build_decoder("confidence", gen_length=16, steps=16, block_length=4, eos_token_id=None, cache="exact")
    dec(model, torch.randint(0, 63, (1, 8)))
    # block 0: prompt + block (12), then the block (4); later blocks: previous + current (8), then 4
    assert model.fed == [12, 4, 4, 4, 8, 4, 4, 4, 8, 4, 4, 4, 8, 4, 4, 4]


def test_exact_cache_with_guidance_equals_no_cache():
    model = block_model(4)
    prompt = torch.randint(0, 63, (2, 4))
    a, b = (
        build_decoder(
            "confidence",
            gen_length=8,
            steps=8,
            block_length=4,
            eos_token_id=None,
            cfg_scale=1.0,
            temperature=0.0,
            cache=c,
            mask_token_id=63,
        )(model, prompt)
        for c in ("none", "exact")
    )
    assert torch.equal(a.tokens, b.tokens)


def test_unaligned_prompt_is_aligned_to_model_blocks_and_hidden_from_the_caller():
    model = block_model(4)
    prompt = torch.randint(0, 63, (2, 5))  # 5 is not a multiple of 4
    out = build_decoder("confidence", gen_length=8, steps=8, block_length=4, cache="exact")(model, prompt)
    assert out.prompt_length == 5 and out.tokens.shape == (2, 13) and torch.equal(out.tokens[:, :5], prompt)


def test_cache_errors_name_what_is_supported():
    with pytest.raises(
        ValueError,
        match="cache='exact' needs a block-causal.*bidirectional. Caches it supports: none, prefix, dual, delayed",
    ):
        build_decoder("confidence", gen_length=8, steps=8, cache="exact")(
            tiny_model(), torch.zeros(1, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="cache='fast'; choose one of none, exact, prefix, dual, delayed"):
        build_decoder("confidence", gen_length=8, steps=8, cache="fast")
    with pytest.raises(ValueError, match="refresh_every=0 must be >= 1"):
        build_decoder("confidence", gen_length=8, steps=8, cache="delayed", refresh_every=0)
    with pytest.raises(ValueError, match="block_length=2 is not a multiple of the model's block size 4"):
        build_decoder("confidence", gen_length=8, steps=8, block_length=2)(
            block_model(4), torch.zeros(1, 4, dtype=torch.long)
        )


def test_alignment_padding_does_not_count_against_the_context():
    model = tiny_model(attention_mode="block_causal", block_size=8, max_position_embeddings=24)
    out = build_decoder("confidence", gen_length=16, steps=16, block_length=8, cache="exact")(
        model, torch.randint(0, 63, (1, 7))
    )  # 7 + 16 = 23 positions; the canvas is padded to 8 + 16
    assert out.tokens.shape == (1, 23)


class NoCacheSupport(nn.Module):
    """A model that takes no KVCache (like a transformers model)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask=attention_mask)


def test_cache_on_a_model_without_cache_support_names_none():
    with pytest.raises(ValueError, match="cache='dual' needs a model that takes a KVCache.*Caches it supports: none"):
        build_decoder("confidence", gen_length=8, steps=8, cache="dual")(
            NoCacheSupport(tiny_model()), torch.zeros(1, 2, dtype=torch.long)
        )


def ragged(batch: int, length: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    prompt = torch.randint(0, 63, (batch, length))
    pad = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        pad[1, :3] = 0
        pad[2, :5] = 0
    return prompt, pad


DECODERS = [
    ("confidence", {}),
    ("confidence", {"rule": "threshold", "threshold": 0.05}),
    ("ancestral", {}),
    ("first_hitting", {}),
]


def decode_pair(model, name, kw, caches, batch, **settings):
    prompt, pad = ragged(batch)
    outs = []
    for cache, extra in caches:
        dec = build_decoder(
            name, gen_length=16, steps=16, block_length=4, eos_token_id=None, cache=cache, **extra, **settings, **kw
        )
        outs.append(dec(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0)))
    return outs


@pytest.mark.parametrize("name, kw", DECODERS)
@pytest.mark.parametrize("batch", [1, 3])
@SHIFT
def test_prefix_cache_on_a_block_causal_model_equals_exact(name, kw, batch, shift):
    none, exact, prefix = decode_pair(
        block_model(4, shift), name, kw, [("none", {}), ("exact", {}), ("prefix", {})], batch
    )
    assert torch.equal(prefix.tokens, exact.tokens) and torch.equal(prefix.tokens, none.tokens)
    assert torch.equal(prefix.step_map, none.step_map)
    torch.testing.assert_close(prefix.logprobs, none.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, kw", DECODERS)
@pytest.mark.parametrize("batch", [1, 3])
@SHIFT
def test_delayed_cache_with_refresh_every_call_equals_no_cache(name, kw, batch, shift):
    none, delayed = decode_pair(
        tiny_model(logits_shift=shift), name, kw, [("none", {}), ("delayed", {"refresh_every": 1})], batch
    )
    assert torch.equal(delayed.tokens, none.tokens)
    assert torch.equal(delayed.step_map, none.step_map)
    torch.testing.assert_close(delayed.logprobs, none.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache", ["prefix", "dual", "delayed"])
def test_one_step_per_block_makes_every_call_a_refresh(cache):
    """Prefix and dual caches refresh at each block's first call, delayed at its first call."""
    settings = {"steps": 4} if cache != "delayed" else {"steps": 4, "refresh_every": 1}
    prompt, pad = ragged(3)
    outs = [
        build_decoder("confidence", gen_length=16, block_length=4, eos_token_id=None, cache=c, **settings)(
            tiny_model(), prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0)
        )
        for c in ("none", cache)
    ]
    assert torch.equal(outs[0].tokens, outs[1].tokens)


@pytest.mark.parametrize("cache, extra", [("prefix", {}), ("dual", {}), ("delayed", {"refresh_every": 3})])
@SHIFT
def test_approximate_caches_decode_each_row_of_a_ragged_batch_as_alone(cache, extra, shift):
    model = tiny_model(logits_shift=shift)
    prompt, pad = ragged(3)
    settings = dict(gen_length=16, steps=16, block_length=4, eos_token_id=None, temperature=0.0, cache=cache, **extra)
    batched = build_decoder("confidence", **settings)(model, prompt, attention_mask=pad)
    for row in range(3):
        real = pad[row].bool()
        alone = build_decoder("confidence", **settings)(model, prompt[row : row + 1, real])
        assert torch.equal(batched.generated[row], alone.generated[0]), f"row {row}"


@pytest.mark.parametrize("cache", ["prefix", "dual", "delayed"])
@pytest.mark.parametrize("block_causal", [False, True])
@pytest.mark.parametrize("prompt_len", [6, 1, 0], ids=["ragged-prompts", "one-token-prompt", "no-prompt"])
@pytest.mark.parametrize("mask_id", [63, 0], ids=["mask-last", "mask-first"])  # LLaDA's is not the last id
@SHIFT
def test_cache_read_back_on_an_unchanged_canvas_equals_the_full_forward(cache, block_causal, prompt_len, mask_id, shift):
    """A block right after a one-token prompt (or at column 0) is where a shifted model's
    predecessor column is easy to miss. A runner returns one row per masked block column (the
    only ones policies read), in row-major order; a ``wanted`` subset returns just those rows."""
    from dlm.decode.caches import make_runner

    model = block_model(4, shift) if block_causal else tiny_model(logits_shift=shift)
    model.config.mask_token_id = mask_id
    tok = lambda *shape: torch.randint(1, 63, shape)  # noqa: E731  (never either mask id)
    if prompt_len > 1:
        prompt, pad = ragged(3)
        prompt = prompt.clamp(min=1)
    else:
        prompt, pad = tok(3, prompt_len), torch.ones(3, prompt_len, dtype=torch.long)
    start = prompt_len + 2 if prompt_len > 1 else prompt_len  # a block after decoded tokens, or right after the prompt
    end = start + 4
    x = torch.cat([prompt, torch.full((3, 12), mask_id)], dim=1)
    x[:, prompt_len:start] = tok(3, start - prompt_len)  # decoded before the block
    x[:, start + 1] = tok(3)  # and one inside it (the block's first column stays masked)
    canvas_pad = torch.cat([pad, torch.ones(3, 12, dtype=torch.long)], dim=1)
    T = x.shape[1]
    full = make_runner("none", model, 3, T, mask_id, 8, True)(x, canvas_pad, start, end, True)
    runner = make_runner(cache, model, 3, T, mask_id, 8, True)
    first = runner(x, canvas_pad, start, end, True)
    again = runner(x, canvas_pad, start, end, False)  # fed from the cache
    masked = x[:, start:end] == mask_id
    assert full.shape == (int(masked.sum()), model.config.vocab_size)
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, full, atol=1e-5, rtol=1e-5)
    some = masked.clone()
    some[1] = False  # a row the policy does not read, and one column of another
    some[0, masked[0].nonzero()[0]] = False
    rows_of_some = some[masked]  # which of full's rows `some` keeps
    torch.testing.assert_close(runner(x, canvas_pad, start, end, False, some), full[rows_of_some], atol=1e-5, rtol=1e-5)


def test_delayed_cache_scores_each_row_as_alone_when_rows_have_different_stale_counts():
    """Rows with fewer stale columns (down to none) are padded with a repeat of their last one,
    which must be scored once: each row's logits equal those of the same calls on that row alone."""
    from dlm.decode.caches import make_runner

    model = tiny_model()
    torch.manual_seed(0)
    x = torch.cat([torch.randint(0, 63, (4, 4)), torch.full((4, 8), 63)], dim=1)  # the last block [4, 12)
    x[0, 4:8] = torch.randint(0, 63, (4,))  # row 0: half the block decoded before the refresh
    x[2, 4:12] = torch.randint(0, 63, (8,))  # row 2: all of it (nothing stale later)
    x[3, 4:11] = torch.randint(0, 63, (7,))  # row 3: all but one column
    later = x.clone()
    later[1, 11] = 5  # row 1 decodes one more token after the refresh; row 3 nothing (one masked column left)
    runner = make_runner("delayed", model, 4, 12, 63, 8, True)
    runner(x, None, 4, 12, True)  # a refresh: nothing is stale
    batched = runner(later, None, 4, 12, False)  # stale columns per row: 4, 8, 0, 1
    per_row = batched.split((later[:, 4:12] == 63).sum(dim=1).tolist())  # one row of logits per masked column
    for row in range(4):
        alone = make_runner("delayed", model, 1, 12, 63, 8, True)
        alone(x[row : row + 1], None, 4, 12, True)
        torch.testing.assert_close(per_row[row], alone(later[row : row + 1], None, 4, 12, False))


def test_delayed_cache_refreshes_after_refresh_every_calls_also_past_small_integers():
    """The call counter is compared by value: with refresh_every = 300 the 300th call is a full forward."""
    from dlm.decode.caches import make_runner

    model = Counting(tiny_model())
    x = torch.cat([torch.randint(0, 63, (1, 4)), torch.full((1, 4), 63)], dim=1)
    runner = make_runner("delayed", model, 1, 8, 63, 300, True)
    for call in range(301):
        runner(x, None, 4, 8, call == 0)
    assert model.fed[0] == model.fed[300] == 8 and set(model.fed[1:300]) == {4}


@pytest.mark.parametrize("mask_id", [63, 0], ids=["mask-last", "mask-first"])
@SHIFT
def test_delayed_cache_feeds_changed_and_masked_columns_and_a_shifted_models_predecessors(mask_id, shift):
    """Prompt [0, 8), block [8, 16). After a refresh, decoding column 12 then 8 feeds: the changed
    column, every masked column and, for a shifted model, the column before each masked block
    column (its hidden state scores it): 7 before column 8, then 12 before column 13."""
    from dlm.decode.caches import make_runner

    model = tiny_model(logits_shift=shift, mask_token_id=mask_id)
    fed = []
    forward = model.forward
    model.forward = lambda *a, **kw: fed.append(set(kw["cache_slots"][0].tolist())) or forward(*a, **kw)
    x = torch.cat([torch.randint(1, 63, (1, 8)), torch.full((1, 8), mask_id)], dim=1)
    runner = make_runner("delayed", model, 1, 16, mask_id, 100, True)
    runner(x, None, 8, 16, True)
    expected = {12: set(range(8, 16)) | ({7} if shift else set()), 8: {8, 9, 10, 11, 13, 14, 15} | ({12} if shift else set())}
    for col, want in expected.items():
        x = x.clone()
        x[0, col] = 5
        runner(x, None, 8, 16, False)
        assert fed[-1] == want, (col, fed[-1])


@pytest.mark.parametrize(
    "cache, fed",
    [
        ("prefix", [24, 16, 16, 16, 24, 12, 12, 12, 24, 8, 8, 8, 24, 4, 4, 4]),
        ("dual", [24, 4, 4, 4] * 4),
    ],
)
@SHIFT
def test_prefix_and_dual_caches_feed_what_they_promise(cache, fed, shift):
    """A shifted model is also fed the column before the block (its hidden state scores the first)."""
    model = Counting(tiny_model(logits_shift=shift))
    dec = build_decoder("confidence", gen_length=16, steps=16, block_length=4, eos_token_id=None, cache=cache)
    dec(model, torch.randint(0, 63, (1, 8)))
    assert model.fed == [n + (shift and n != 24) for n in fed]


class LogitsOnly(nn.Module):
    """A transformers-style model: ``.logits`` out, no output mask, no KVCache."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.inner(input_ids, attention_mask=attention_mask).logits})()


def test_a_model_without_output_mask_decodes_each_row_of_a_ragged_batch_as_alone():
    model = LogitsOnly(tiny_model())
    prompt, pad = ragged(3)
    settings = dict(gen_length=8, steps=8, block_length=4, eos_token_id=None, temperature=0.0)
    batched = build_decoder("confidence", **settings)(model, prompt, attention_mask=pad)
    for row in range(3):
        alone = build_decoder("confidence", **settings)(model, prompt[row : row + 1, pad[row].bool()])
        assert torch.equal(batched.generated[row], alone.generated[0]), f"row {row}"


def test_names_read_from_text_choose_like_literals():
    """Names from a recipe or the command line are equal strings, not the same objects as the
    literals in the code (compared with ==, never `is`)."""
    from dlm.decode.caches import check_cache, make_runner, supported_caches

    text = lambda s: "".join(list(s))  # noqa: E731  (an equal string built at run time)
    for name in ("none", "exact", "prefix", "dual", "delayed"):
        runner = make_runner(text(name), block_model(4), 1, 8, 63, 2, True)
        assert type(runner) is type(make_runner(name, block_model(4), 1, 8, 63, 2, True))
    assert make_runner(text("dual"), tiny_model(), 1, 8, 63, 2, True).dual
    assert not make_runner(text("prefix"), tiny_model(), 1, 8, 63, 2, True).dual
    for bad in ("bogus", "zzz"):
        with pytest.raises(ValueError, match=f"cache='{bad}'; choose one of"):
            make_runner(bad, tiny_model(), 1, 8, 63, 2, True)
    model = block_model(4)
    model.config.attention_mode = text("block_causal")
    assert supported_caches(model) == ["none", "exact", "prefix", "dual", "delayed"]
    model.config.attention_mode = text("causal")
    assert supported_caches(model) == ["none"]
    with pytest.raises(ValueError, match="cache='exact' needs a block-causal .*this model is causal"):
        check_cache(model, text("exact"))
    for cache in ("prefix", "dual", "delayed"):
        with pytest.raises(ValueError, match=f"cache='{cache}' needs a bidirectional or block-causal .*causal"):
            check_cache(model, text(cache))


@pytest.mark.parametrize(
    "refresh_every, block, refreshes",
    [(5, 4, {0, 4, 8, 12}), (2, 4, {0, 2, 4, 6, 8, 10, 12, 14}), (4, 8, {0, 4, 8, 12})],
)
@pytest.mark.parametrize("mask_id", [63, 0], ids=["mask-last", "mask-first"])  # LLaDA's is not the last id
def test_delayed_cache_feeds_masked_tokens_and_each_decoded_token_once_more(refresh_every, block, refreshes, mask_id):
    model = Counting(tiny_model(mask_token_id=mask_id))
    dec = build_decoder(
        "confidence",
        gen_length=16,
        steps=16,
        block_length=block,
        eos_token_id=None,
        cache="delayed",
        refresh_every=refresh_every,
    )
    dec(model, torch.randint(1, 63, (1, 8)))
    # full forwards (24 columns) at block starts and every r calls; any other call i (one token
    # decoded per step) feeds the 16 - i masked columns + the one decoded at call i - 1
    assert model.fed == [24 if i in refreshes else 16 - i + 1 for i in range(16)]
