import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dlm.decode.ancestral import AncestralDecoder
from dlm.decode.autoregressive import AutoregressiveDecoder
from dlm.decode.sampling import Scratch, sample_categorical


class ConstantModel(nn.Module):
    """Time-independent, context-free logits; puts a large logit on the mask token (SUBS must ignore it)."""

    def __init__(self, vocab: int = 8, mask: int = 7):
        super().__init__()
        self.vocab, self.mask = vocab, mask

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.mask] = 50.0
        return logits


def test_float64_sampler_matches_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    n = 200_000
    tokens, logp = sample_categorical(probs.log().expand(n, -1), 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[5] == 0  # zero probability is never drawn
    expected = probs[:5].double() * n
    chi2 = ((counts[:5] - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.5  # χ²(4) 0.999 quantile
    torch.testing.assert_close(logp, probs.double().log()[tokens])


def chi2_critical(dof: int) -> float:
    """The χ²(dof) 0.999 quantile (Wilson–Hilferty), the threshold of the float64 sampler tests."""
    return dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_at_a_temperature_follows_softmax_of_logits_over_temperature(temperature):
    probs = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02, 0.0])
    logits = probs.log()  # the last token has probability 0 at every temperature
    n = 100_000
    g = torch.Generator().manual_seed(0)
    tokens, logp = sample_categorical(logits.expand(n, -1), temperature, g)
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[7] == 0
    tempered = torch.softmax(logits.double()[:7] / temperature, 0)

    def chi2(p):
        return ((counts[:7] - n * p) ** 2 / (n * p)).sum().item()

    assert chi2(tempered) < chi2_critical(6), chi2(tempered)
    assert chi2(probs.double()[:7]) > 100 * chi2_critical(6)  # temperature 1 would be rejected: not vacuous
    torch.testing.assert_close(logp, tempered.log()[tokens])  # the log-prob of the tempered distribution


def test_temperature_zero_is_argmax():
    logits = torch.randn(10, 30)
    tokens, _ = sample_categorical(logits, 0.0, None)
    assert torch.equal(tokens, logits.argmax(-1))


def test_the_greedy_log_prob_is_the_argmax_log_prob_under_temperature_one():
    """RL reads it as the decode-time log-prob: confident rows (p near 1) included, far from any bound."""
    logits = torch.tensor([[6.0, 0.0, 0.0, -1.0], [0.3, 0.2, 0.1, 0.0], [40.0, -40.0, 0.0, 1.0]])
    tokens, logp = sample_categorical(logits, 0.0, None)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, torch.log_softmax(logits.double(), -1)[torch.arange(3), tokens])
    assert -0.01 < logp[0] < 0 and logp[2] > -1e-15  # p(argmax) ~0.995 and ~1


def test_ancestral_decodes_everything_and_keeps_the_prompt():
    model = tiny_model()
    prompt = torch.randint(0, 63, (3, 5))
    out = AncestralDecoder(gen_length=12, steps=6)(model, prompt, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens[:, :5], prompt)
    assert not (out.generated == 63).any()  # nothing left masked, the mask token never sampled
    assert (out.step_map[:, :5] == -1).all() and ((out.step_map[:, 5:] >= 0) & (out.step_map[:, 5:] < 6)).all()
    assert (out.logprobs[:, 5:] <= 0).all() and (out.logprobs[:, :5] == 0).all()
    assert (out.nfe >= 1).all() and (out.nfe <= 6).all() and out.model_calls <= 6
    assert out.times is None  # unmasking times are the first-hitting sampler's


def test_ancestral_is_reproducible_for_a_seed_and_differs_across_seeds():
    """Greedy determinism across seeds is tested in test_decoders.py (every decoder)."""
    model = tiny_model()
    prompt = torch.randint(0, 63, (2, 4))
    dec = AncestralDecoder(gen_length=10, steps=10)
    a = dec(model, prompt, generator=torch.Generator().manual_seed(1))
    b = dec(model, prompt, generator=torch.Generator().manual_seed(1))
    c = dec(model, prompt, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step_map, b.step_map)
    assert not torch.equal(a.tokens, c.tokens)  # the generator is used: reproducibility is not vacuous


def test_ancestral_never_samples_the_mask_token():
    out = AncestralDecoder(gen_length=32, steps=8, mask_token_id=7)(
        ConstantModel(), torch.zeros(4, 0, dtype=torch.long), generator=torch.Generator().manual_seed(0)
    )
    assert not (out.tokens == 7).any()


def test_no_change_cache_nfe_matches_closed_form():
    """Expected model calls N·(1 − (1 − 1/N)^L) under the linear schedule (docs/decoders.md#ancestral-sampling)."""
    N, L, runs = 32, 24, 400
    dec = AncestralDecoder(gen_length=L, steps=N, mask_token_id=7)
    g = torch.Generator().manual_seed(0)
    out = dec(ConstantModel(), torch.zeros(runs, 0, dtype=torch.long), generator=g)
    expected = N * (1 - (1 - 1 / N) ** L)
    mean, se = out.nfe.double().mean().item(), out.nfe.double().std().item() / math.sqrt(runs)
    assert abs(mean - expected) < 4 * se, (mean, expected)
    assert out.model_calls <= N


def test_batched_left_padded_prompts_match_single_prompts_at_temperature_zero():
    model = tiny_model()
    a, b = torch.randint(0, 63, (1, 6)), torch.randint(0, 63, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    pad = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    dec = AncestralDecoder(gen_length=8, steps=8, temperature=0.0)
    out = dec(model, batch, attention_mask=pad, generator=torch.Generator().manual_seed(0))
    # the unmasking times depend on the generator's draws per position; greedy tokens on a single-step
    # schedule do not, so compare with steps=1 where every token is decided at once
    one = AncestralDecoder(gen_length=8, steps=1, temperature=0.0)
    both = one(model, batch, attention_mask=pad)
    assert torch.equal(both.generated[0], one(model, a).generated[0])
    assert torch.equal(both.generated[1], one(model, b).generated[0])
    assert out.tokens.shape == (2, 14)


def test_prompt_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="beyond the model's context of 128"):
        AncestralDecoder(gen_length=100, steps=4)(tiny_model(), torch.zeros(1, 40, dtype=torch.long))


def test_bad_decoder_settings():
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        AncestralDecoder(gen_length=8, steps=0)
    with pytest.raises(ValueError, match="no mask token id"):
        AncestralDecoder(gen_length=4, steps=2)(ConstantModel(), torch.zeros(1, 2, dtype=torch.long))


def test_autoregressive_decoder_on_causal_model():
    model = tiny_model(attention_mode="causal")
    out = AutoregressiveDecoder(gen_length=6, temperature=0.0)(model, torch.randint(0, 63, (2, 3)))
    assert out.tokens.shape == (2, 9) and out.step_map[0, 3:].tolist() == list(range(6))
    # greedy continuation is consistent with the model's own next-token argmax
    full = model(out.tokens).logits
    assert torch.equal(full[:, 2:-1].argmax(-1), out.tokens[:, 3:])


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("prompt_length", [0, 3])
def test_the_ar_decoder_over_its_kv_cache_equals_recomputing_the_prefix(shift, prompt_length):
    """The cached AR decoder (the prefix once, then one column per token) draws the tokens and
    log-probs of re-running the whole prefix each step: greedy and sampled, left-padded rows,
    logit-shifted models, no prompt."""
    model = tiny_model(attention_mode="causal", logits_shift=shift).eval()
    prompt = torch.randint(0, 63, (3, prompt_length))
    pad = torch.ones(3, prompt_length, dtype=torch.long)
    if prompt_length:
        pad[1, :2] = 0  # row 1 is left-padded
    for temperature in (0.0, 1.0):
        outs = [
            AutoregressiveDecoder(gen_length=7, temperature=temperature, use_cache=use_cache)(
                model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(5)
            )
            for use_cache in (True, False)
        ]
        assert torch.equal(outs[0].tokens, outs[1].tokens)
        torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5, rtol=0)


def test_sampling_is_shift_invariant_at_any_logit_scale_and_reads_any_weight_layout():
    """Logits far from zero (an unnormalised head, ±1000) sample the tokens and log-probs of the
    same logits centred — the weights are exp(logit − max), never exp of a large number — and
    inverse_cdf gives the same token for weights in any memory layout (transposed, broadcast)."""
    from dlm.decode.sampling import inverse_cdf

    logits = torch.randn(32, 300, generator=torch.Generator().manual_seed(3))
    for offset in (1000.0, -1000.0):
        a = sample_categorical(logits, 1.0, torch.Generator().manual_seed(4))
        b = sample_categorical(logits + offset, 1.0, torch.Generator().manual_seed(4))
        assert torch.equal(a[0], b[0]) and torch.isfinite(b[1]).all()
        torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=0)  # float32 logits near 1000 keep ~1e-4
    u = torch.rand(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights = torch.rand(300, 8, generator=torch.Generator().manual_seed(6))
    layouts = [weights.t(), torch.ones(8, 1).expand(8, 300), torch.ones(1, 1).expand(8, 300)]
    for w in layouts:
        got, want = inverse_cdf(w, u), inverse_cdf(w.contiguous(), u)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_half_precision_logits_are_sampled_in_float32_and_a_short_last_chunk_is_read():
    """bf16/fp16 logits give the tokens and log-probs of their float32 values; a vocabulary of 300
    (an even size, its last 256-column chunk short) samples tokens in that chunk as in the first."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g)
    for half in (torch.bfloat16, torch.float16):
        low = logits.to(half)
        a = sample_categorical(low, 1.0, torch.Generator().manual_seed(1))
        b = sample_categorical(low.float(), 1.0, torch.Generator().manual_seed(1))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    peaked = torch.full((4, 300), -30.0)
    peaked[torch.arange(4), torch.tensor([3, 255, 256, 299])] = 30.0  # the mass on one token per row
    tokens, logp = sample_categorical(peaked, 1.0, torch.Generator().manual_seed(2))
    assert tokens.tolist() == [3, 255, 256, 299] and torch.allclose(logp, torch.zeros(4, dtype=torch.float64))


def test_a_decode_scratch_reuses_one_buffer_and_changes_no_draw():
    """Within a decode the sampler's [N, V] working tensor is one reused buffer (on the CPU a fresh
    one is a page-faulting mapping); the tokens and log-probs equal those of fresh allocations."""
    logits = torch.randn(6, 300, dtype=torch.float32)
    logits[:, 7] = float("-inf")
    fresh = [sample_categorical(logits, t, torch.Generator().manual_seed(0)) for t in (1.0, 0.0, 0.7)]
    scratch = Scratch()
    with scratch.active():
        reused = [sample_categorical(logits, 1.0, torch.Generator().manual_seed(0))]
        buffer, flat = scratch.flat.data_ptr(), scratch.flat
        reused += [sample_categorical(logits[:4], t, torch.Generator().manual_seed(0)) for t in (0.0, 0.7)]
        assert scratch.flat is flat  # smaller draws reuse it
    for (tok, lp), (rtok, rlp) in zip(fresh, reused):
        n = rtok.shape[0]
        assert torch.equal(tok[:n], rtok) and torch.equal(lp[:n], rlp)
        assert rlp.untyped_storage().data_ptr() != buffer  # nothing returned aliases the buffer
    kept = scratch.flat.clone()
    sample_categorical(logits * 2, 1.0, None)  # outside the decode: the buffer is not touched
    assert torch.equal(scratch.flat, kept)


def test_decoding_steps_sample_in_the_decode_scratch(monkeypatch):
    import dlm.decode.confidence as confidence
    from dlm.decode import build_decoder
    from dlm.decode.sampling import _SCRATCH

    seen = []

    def spy(*args, **kwargs):
        seen.append(_SCRATCH.get())
        return sample_categorical(*args, **kwargs)

    monkeypatch.setattr(confidence, "sample_categorical", spy)
    decoder = build_decoder("confidence", gen_length=8, steps=8, block_length=4, eos_token_id=None)
    decoder(tiny_model(), torch.randint(0, 20, (2, 3)), generator=torch.Generator().manual_seed(0))
    assert len(seen) == 8 and seen[0] is not None and all(s is seen[0] for s in seen)  # one scratch, every step
