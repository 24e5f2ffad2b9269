"""Pipelined multi-block decoding (D2F / dInfer style): ``open_next_at`` and ``max_open_blocks``.

Block b+1 becomes eligible once every unfinished row has decoded ``open_next_at`` of block b (the
newest open block); at most ``max_open_blocks`` are open at once; ``open_next_at = 1`` is ordinary
block-by-block decoding, token for token.
"""

import pytest
import torch

from conftest import tiny_model
from dlm.decode import build_decoder

MASK = 63


def sharp_model(**kw):
    """A tiny random model with sharper logits: several positions clear a low threshold per step."""
    model = tiny_model(**kw)
    with torch.no_grad():
        model.norm.weight.mul_(5.0)
    return model


def decode(model, prompt, **kw):
    settings = dict(gen_length=32, steps=32, block_length=8, rule="threshold", threshold=0.05, temperature=0.0)
    return build_decoder("confidence", eos_token_id=None, **{**settings, **kw})(model, prompt)


CASES = [  # (model settings, cache)
    ({}, "none"),
    ({}, "prefix"),
    ({}, "dual"),
    ({}, "delayed"),
    ({"attention_mode": "block_causal", "block_size": 8}, "exact"),
]


@pytest.mark.parametrize("model_kw,cache", CASES, ids=[c for _, c in CASES])
@pytest.mark.parametrize("rule", ["threshold", "factor"])
def test_open_next_at_one_or_one_open_block_is_block_by_block_decoding(model_kw, cache, rule):
    model = sharp_model(**model_kw)
    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(0))
    base = decode(model, prompt, cache=cache, rule=rule, factor=1.0)
    for kw in ({"open_next_at": 1.0, "max_open_blocks": 4}, {"open_next_at": 0.25, "max_open_blocks": 1}):
        out = decode(model, prompt, cache=cache, rule=rule, factor=1.0, **kw)
        assert torch.equal(out.tokens, base.tokens) and torch.equal(out.step_map, base.step_map), kw
        assert torch.equal(out.logprobs, base.logprobs) and torch.equal(out.nfe, base.nfe), kw
        assert out.model_calls == base.model_calls


def opened_windows(history, prompt_length, block, blocks):
    """Per step: the blocks that received tokens, and the decoded fraction of every block (min over
    rows) in the canvas before that step."""
    out = []
    for before, after in zip(history[:-1], history[1:]):
        gen_before, gen_after = before[:, prompt_length:], after[:, prompt_length:]
        new = (gen_before == MASK) & (gen_after != MASK)
        got = sorted({int(c) // block for c in new.nonzero()[:, 1]})
        frac = [
            (gen_before[:, j * block : (j + 1) * block] != MASK).double().mean(1).min().item() for j in range(blocks)
        ]
        out.append((got, frac))
    return out


@pytest.mark.parametrize("open_next_at,max_open", [(0.5, 2), (0.25, 3), (0.0, 2)])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_block_opens_only_past_the_fraction_and_never_more_than_max_open_blocks(open_next_at, max_open, cache):
    model = sharp_model()
    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(1))
    out = decode(model, prompt, cache=cache, open_next_at=open_next_at, max_open_blocks=max_open, record_history=True)
    initial = torch.cat([prompt, torch.full((3, 32), MASK)], dim=1)
    steps = opened_windows([initial, *out.history], 5, 8, 4)
    first_token = {}
    overlapped = False
    for s, (got, frac) in enumerate(steps):
        if not got:
            continue
        oldest = next(j for j in range(4) if frac[j] < 1.0)  # the oldest block not decoded in every row
        assert all(oldest <= j < oldest + max_open for j in got), (s, got, frac)
        for j in got:
            first_token.setdefault(j, (s, frac))
        overlapped |= any(frac[j] < 1.0 for j in range(oldest, max(got)))
    for j, (s, frac) in first_token.items():  # block j first got a token once block j-1 had passed the fraction
        assert j == 0 or frac[j - 1] >= open_next_at, (j, s, frac)
    assert overlapped, "no step decoded a block while an earlier one was still open: nothing was pipelined"
    assert (out.canvas[:, 5:] != MASK).all()  # every position decoded, none stranded in a closed block


def test_pipelining_keeps_the_exact_cache_exact_on_a_block_causal_model():
    """Finished blocks stay final while later ones are open, so the exact cache still equals no cache."""
    model = sharp_model(attention_mode="block_causal", block_size=8)
    prompt = torch.randint(0, MASK, (3, 8), generator=torch.Generator().manual_seed(2))
    kw = {"open_next_at": 0.5, "max_open_blocks": 3}
    plain = decode(model, prompt, cache="none", **kw)
    exact = decode(model, prompt, cache="exact", **kw)
    assert torch.equal(exact.tokens, plain.tokens) and torch.equal(exact.step_map, plain.step_map)
    torch.testing.assert_close(exact.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    assert not torch.equal(plain.step_map, decode(model, prompt, cache="none").step_map)  # it did pipeline


def test_pipelining_stops_rows_at_eos_like_block_by_block_decoding():
    """A row that produced EOS in a closed block is finished; every other position it has is as decoded."""
    model = sharp_model()
    prompt = torch.randint(0, MASK, (4, 5), generator=torch.Generator().manual_seed(3))
    eos = int(decode(model, prompt).canvas[0, 7])  # a token the model does produce early
    out = build_decoder(
        "confidence", gen_length=32, steps=32, block_length=8, rule="threshold", threshold=0.05,
        temperature=0.0, eos_token_id=eos, open_next_at=0.5,
    )(model, prompt)  # fmt: skip
    gen = out.tokens[:, 5:]
    for row in range(4):
        hits = (gen[row] == eos).nonzero()
        if len(hits):
            assert (gen[row, int(hits[0]) :] == eos).all()  # the text view reads EOS after the first one
    assert ((out.canvas[:, 5:] != MASK) | (out.step_map[:, 5:] == -1)).all()


def test_bad_pipelining_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"open_next_at=1.5 must lie in \[0, 1\]"):
        build_decoder("confidence", gen_length=8, steps=8, rule="threshold", open_next_at=1.5)
    with pytest.raises(ValueError, match="max_open_blocks=0 must be >= 1"):
        build_decoder("confidence", gen_length=8, steps=8, rule="threshold", max_open_blocks=0)
    with pytest.raises(ValueError, match="rule=threshold or rule=factor"):
        build_decoder("confidence", gen_length=8, steps=8, block_length=4, open_next_at=0.5)
    with pytest.raises(ValueError, match="rule=threshold or rule=factor"):  # a rule read from text compares by value
        build_decoder("confidence", gen_length=8, steps=8, block_length=4, open_next_at=0.5, rule="".join("schedule"))
    for rule in ("threshold", "factor"):  # both rules pipeline
        assert build_decoder("confidence", gen_length=8, steps=8, block_length=4, open_next_at=0.5, rule=rule).pipelined
    with pytest.raises(ValueError, match="rule=threshold or rule=factor"):
        build_decoder("ancestral", gen_length=8, steps=8, block_length=4, open_next_at=0.5)


@pytest.mark.parametrize(
    "kw,per_step",
    [
        ({}, 2),  # is anything masked; did a row the step reads change since the last call
        ({"open_next_at": 0.5, "max_open_blocks": 3}, 4),  # + may the next block open; is the oldest decoded
    ],
    ids=["block-by-block", "pipelined"],
)
def test_host_syncs_per_decoding_step_are_the_ones_the_loop_needs(monkeypatch, kw, per_step):
    """Each ``bool()`` / ``int()`` / ``.item()`` of a tensor waits for the device: the confidence loop
    makes only the decisions above per step (plus one per block close), never one per position."""
    counts = {"n": 0}
    for name in ("__bool__", "__int__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            counts["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model = sharp_model()
    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(0))
    dec = build_decoder(
        "confidence", gen_length=32, steps=32, block_length=8, rule="threshold", threshold=0.05,
        temperature=1.0, eos_token_id=None, **kw,
    )  # fmt: skip
    counts["n"] = 0
    out = dec(model, prompt, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    steps = int(out.step_map.max()) + 1
    assert counts["n"] <= per_step * steps + 2 * 4 + 4, (counts["n"], steps)
