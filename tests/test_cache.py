"""SPEC §7: the exact block cache equals no cache, token for token."""

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dlm.decode import build_decoder


def block_model(block: int = 4):
    return tiny_model(attention_mode="block_causal", block_size=block)


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
def test_exact_cache_equals_no_cache(name, kw, batch):
    model = block_model(4)
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
    with pytest.raises(ValueError, match="cache='exact' needs a block-causal.*bidirectional.*Caches it supports: none"):
        build_decoder("confidence", gen_length=8, steps=8, cache="exact")(
            tiny_model(), torch.zeros(1, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="cache='dual'; choose one of none, exact"):
        build_decoder("confidence", gen_length=8, steps=8, cache="dual")
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
