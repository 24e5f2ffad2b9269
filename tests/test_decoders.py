"""Decoder invariants (docs/decoders.md): exactness against an oracle, FHS statistics, float64
sampling, LLaDA schedules, blocks, stopping, guidance, batching and bad input."""

import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dlm.decode import build_decoder, decoder_names
from dlm.decode.confidence import count_from_rule, transfer_schedule
from dlm.decode.sampling import sample_categorical
from oracle import MASK, L, Oracle, chi2_ok, empirical, make_joint

N = 20000
SEQS, PROBS = make_joint()


def sample_oracle(name: str, **kw) -> torch.Tensor:
    dec = build_decoder(name, gen_length=L, mask_token_id=MASK, eos_token_id=None, **kw)
    out = dec(Oracle(SEQS, PROBS), torch.zeros(N, 0, dtype=torch.long), generator=torch.Generator().manual_seed(7))
    assert not (out.tokens == MASK).any()
    return empirical(out.tokens)


def test_first_hitting_reproduces_the_joint():
    ok, stat = chi2_ok(sample_oracle("first_hitting", steps=L), PROBS, N)
    assert ok, stat


def test_confidence_random_order_one_token_per_step_reproduces_the_joint():
    ok, stat = chi2_ok(sample_oracle("confidence", steps=L, remasking="random"), PROBS, N)
    assert ok, stat


def test_ancestral_converges_to_the_joint_as_steps_grow():
    freq = {s: sample_oracle("ancestral", steps=s) for s in (1, 4, 512)}
    tv = {s: 0.5 * (f - PROBS).abs().sum().item() for s, f in freq.items()}
    ok, stat = chi2_ok(freq[512], PROBS, N)
    assert tv[1] > tv[4] > tv[512] and tv[1] > 0.2, tv  # one step = independent marginals: far off
    assert ok, (stat, tv)


def test_semi_ar_blocks_of_one_with_fhs_is_exact_left_to_right():
    ok, stat = chi2_ok(sample_oracle("first_hitting", steps=L, block_length=1), PROBS, N)
    assert ok, stat


class Constant(nn.Module):
    def __init__(self, vocab=8):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, self.vocab)


def test_first_hitting_order_is_a_uniform_permutation_and_times_are_sorted_uniforms():
    n, length = 24000, 4
    dec = build_decoder("first_hitting", gen_length=length, steps=length, mask_token_id=7)
    out = dec(Constant(), torch.zeros(n, 0, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert (out.nfe == length).all() and out.model_calls == length  # exactly L evaluations
    perms = out.step_map.argsort(dim=1)  # positions in the order they unmasked
    codes = (perms * (length ** torch.arange(length - 1, -1, -1))).sum(-1)
    counts = torch.bincount(codes, minlength=length**length)[torch.bincount(codes, minlength=length**length) > 0]
    assert len(counts) == 24
    ok, stat = chi2_ok(counts.double() / n, torch.full((24,), 1 / 24, dtype=torch.float64), n)
    assert ok, stat
    times = out.times
    assert torch.isfinite(times).all() and (times > 0).all() and (times <= 1).all()
    # later unmasking = earlier in reverse time: times decrease along the unmasking order
    ordered = times.gather(1, perms)
    assert (ordered[:, 1:] < ordered[:, :-1]).all()
    # the set of times is L iid uniforms: pooled times ~ U(0,1), the first ~ Beta(L,1) (KS at 1%)
    for sample, cdf in ((times.flatten(), lambda t: t), (ordered[:, 0], lambda t: t**length)):
        s = sample.sort().values
        emp = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
        d = (emp - cdf(s)).abs().max().item()
        assert d < 1.63 / math.sqrt(len(s)), d


def ks_distance(sample: torch.Tensor, cdf) -> float:
    """Kolmogorov–Smirnov distance between a sample's empirical CDF and ``cdf``."""
    s = sample.sort().values.double()
    hi = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
    return torch.maximum(hi - cdf(s), cdf(s) - (hi - 1 / len(s))).max().item()


@pytest.mark.parametrize(
    "schedule, cdf",
    [
        ("cosine", lambda t: 1 - torch.cos(math.pi * t / 2)),  # 1 − α_t with α_t = cos(πt/2)
        ("polynomial", lambda t: t**2),  # 1 − α_t with α_t = 1 − t² (k = 2)
    ],
    ids=["cosine", "polynomial"],
)
def test_first_hitting_times_follow_one_minus_alpha_under_nonlinear_schedules(schedule, cdf):
    """A block starts fully masked at t = 1 and each token unmasks at the time the forward process
    masked it, so the L unmasking times are iid with P(T <= s) = (1 − α_s) / (1 − α_1) (α_1 = 0
    here); the first to unmask is their maximum, with CDF (1 − α_s)^L. KS at the 1% level."""
    n, length = 6000, 4
    dec = build_decoder("first_hitting", gen_length=length, steps=length, mask_token_id=7, schedule=schedule)
    out = dec(Constant(), torch.zeros(n, 0, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    times = out.times
    first = times.gather(1, out.step_map.argsort(dim=1))[:, 0]
    assert torch.equal(first, times.max(1).values)
    for sample, law in ((times.flatten(), cdf), (first, lambda t: cdf(t) ** length)):
        d = ks_distance(sample, law)
        assert d < 1.63 / math.sqrt(len(sample)), d
    assert ks_distance(times.flatten(), lambda t: t) > 0.05  # the linear law is far off: not vacuous


def gumbel_float32(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The float32 Gumbel-max that docs/decoders.md#categorical-sampling warns about (kept here only to show it fails)."""
    u = torch.rand(logits.shape, generator=g, dtype=torch.float32)
    return (logits.float() - torch.log(-torch.log(u))).argmax(-1)


def test_float64_sampling_is_right_at_tiny_probabilities_where_float32_gumbel_is_not():
    vocab, n, chunk = 50000, 20000, 1000
    # 49999 tail tokens of probability ~1e-7 each (≈5e-3 together): a float32 uniform caps Gumbel noise
    # near 16.6, below the ~16.1 + spread that such a token needs to win, so about half its draws are lost
    logits = torch.full((vocab,), -math.log(1e7))
    logits[0] = 0.0
    tail_p = 1 - torch.softmax(logits.double(), 0)[0].item()
    g64, g32 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    tail64 = tail32 = 0
    for _ in range(n // chunk):
        batch = logits.expand(chunk, -1)
        tail64 += int((sample_categorical(batch, 1.0, g64)[0] != 0).sum())
        tail32 += int((gumbel_float32(batch, g32) != 0).sum())
    expected = tail_p * n

    def chi2(obs):  # two cells: head and tail
        return (obs - expected) ** 2 / expected + (obs - expected) ** 2 / (n - expected)

    assert chi2(tail64) < 10.83, (tail64, expected)  # passes at the 0.001 level
    assert chi2(tail32) > 10.83, (tail32, expected)  # float32 Gumbel measurably under-samples the tail


def test_llada_schedule_counts():
    counts = transfer_schedule(torch.tensor([10, 7, 3]), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 1, 0]]
    assert counts.sum(1).tolist() == [10, 7, 3]


def test_blocks_decode_left_to_right_and_every_step_decodes_something():
    model = tiny_model()
    dec = build_decoder("confidence", gen_length=16, steps=8, block_length=4, temperature=0.0, eos_token_id=None)
    out = dec(model, torch.randint(0, 63, (3, 5)))
    sm = out.step_map[:, 5:].view(3, 4, 4)  # [B, block, pos]
    assert (sm[:, 1:].min(-1).values > sm[:, :-1].max(-1).values).all()  # nothing beyond the current block
    assert (sm >= 0).all()
    for row in out.step_map[:, 5:]:
        assert set(row.tolist()) == set(range(8))  # 2 steps per block, each decodes >= 1 token
    assert (out.nfe == 8).all()


@torch.no_grad()
def greedy_replay_ok(model, out, mask: int = 63) -> bool:
    """Each decoded token is the SUBS argmax of the model on the canvas it was decoded from
    (that canvas: the final one with every position decoded at that step or later masked)."""
    for s in torch.unique(out.step_map[out.step_map >= 0]).tolist():
        x = out.canvas.masked_fill(out.step_map >= s, mask)
        logits = model(x).logits.float()
        logits[..., mask] = float("-inf")
        now = out.step_map == s
        if not torch.equal(logits.argmax(-1)[now], out.canvas[now]):
            return False
    return True


@pytest.mark.parametrize("name", ["ancestral", "first_hitting", "confidence"])
def test_temperature_zero_tokens_do_not_depend_on_the_seed(name):
    """Greedy decoding with generators seeded 0 and 1 gives the same tokens. With blocks of one
    token every decoder's order is fixed (left to right), so tokens, steps and log-probs must agree
    exactly; confidence decoding's order is deterministic in a single block too."""
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 63, (3, 4), generator=torch.Generator().manual_seed(0))
    layouts = [{"block_length": 1}] + ([{}] if name == "confidence" else [])
    for kw in layouts:
        dec = build_decoder(name, gen_length=8, steps=8, temperature=0.0, eos_token_id=None, **kw)
        a = dec(model, prompt, generator=torch.Generator().manual_seed(0))
        b = dec(model, prompt, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step_map, b.step_map), kw
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
        assert greedy_replay_ok(model, a), kw


@pytest.mark.parametrize("name", ["ancestral", "first_hitting"])
def test_temperature_zero_tokens_are_the_argmax_given_a_seed_dependent_order(name):
    """In one block of several tokens, ancestral and first-hitting decoding draw *which* positions
    unmask from the generator even at temperature 0 (first-hitting picks a uniform position), so
    the order, and with a contextual model the tokens, legitimately depend on the seed. What is
    deterministic is each token given the order: the argmax of the model on the canvas it was
    decoded from, for seeds 0 and 1 alike."""
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 63, (3, 4), generator=torch.Generator().manual_seed(0))
    dec = build_decoder(name, gen_length=8, steps=8, temperature=0.0, eos_token_id=None)
    a = dec(model, prompt, generator=torch.Generator().manual_seed(0))
    b = dec(model, prompt, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.step_map, b.step_map)  # the order is the seed's
    assert greedy_replay_ok(model, a) and greedy_replay_ok(model, b)


def test_threshold_above_one_decodes_one_token_per_step():
    model = tiny_model()
    dec = build_decoder("confidence", gen_length=12, steps=3, rule="threshold", threshold=1.5, temperature=0.0)
    out = dec(model, torch.randint(0, 63, (2, 3)))
    for row in out.step_map[:, 3:]:
        assert sorted(row.tolist()) == list(range(12))  # one per step, steps adapt to the length
    assert (out.nfe == 12).all()


def test_threshold_and_factor_rules():
    conf = torch.tensor([[0.95, 0.5, 0.92, 0.1], [0.3, 0.2, 0.1, 0.05]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    assert count_from_rule(conf, masked, "threshold", 0.9, 1.0).tolist() == [2, 1]  # row 2: at least one
    # factor: sorted [0.95, 0.92, 0.5, 0.1]: n=1: 2*0.05=0.1<1 ok; n=2: 3*0.08=0.24 ok; n=3: 4*0.5=2 no
    assert count_from_rule(conf, masked, "factor", 0.9, 1.0).tolist() == [2, 1]
    # at the factor rule's boundary: sorted [0.9, 0.75, 0.5, 0.2]: n=2: 3*0.25 = 0.75 < 1 ok, n=3: 4*0.5 = 2 no;
    # [0.99, 0.98, 0.97, 0.3]: n=3: 4*0.03 = 0.12 ok, n=4: 5*0.7 no. Rule names read from text work alike.
    edge = torch.tensor([[0.9, 0.75, 0.5, 0.2], [0.99, 0.98, 0.97, 0.3]])
    assert count_from_rule(edge, masked, "".join(["fac", "tor"]), 0.9, 1.0).tolist() == [2, 3]
    assert count_from_rule(edge, masked, "".join(["thres", "hold"]), 0.9, 1.0).tolist() == [1, 3]
    only = masked.clone()
    only[1, :3] = False  # the confident columns are not masked: one decodes
    assert count_from_rule(edge, only, "threshold", 0.9, 1.0).tolist() == [1, 1]


class FixedRows(nn.Module):
    """Column 1 predicts [0.6, 0.4], column 2 [0.8, 0.2] over tokens 0 and 1 (vocab 8, mask 7)."""

    def forward(self, input_ids, attention_mask=None):
        probs = torch.full((*input_ids.shape, 8), 1e-9)
        probs[:, 1, :2] = torch.tensor([0.6, 0.4])
        probs[:, 2, :2] = torch.tensor([0.8, 0.2])
        return probs.log()


@pytest.mark.parametrize("filtering", [{"top_p": 0.5}, {"top_k": 1}], ids=["top_p", "top_k"])
def test_confidence_is_the_models_probability_under_filtering_not_the_filtered_one(filtering):
    """top_p = 0.5 or top_k = 1 keeps one token at each column (filtered probability 1 at both);
    the column the model is surer of (column 2) must still decode first."""
    dec = build_decoder("confidence", gen_length=2, steps=2, block_length=2, mask_token_id=7, **filtering)
    out = dec(FixedRows(), torch.zeros(1, 1, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert out.generated.tolist() == [[0, 0]] and out.step_map[0, 1:].tolist() == [1, 0]


def test_factor_rule_on_an_odd_number_of_positions_and_its_validation():
    """Blocks of odd length (5 candidates) and the factor's domain (it must be positive)."""
    conf = torch.tensor([[0.99, 0.98, 0.97, 0.2, 0.1]])
    masked = torch.ones_like(conf, dtype=torch.bool)
    # n=1: 2*0.01 < 1; n=2: 3*0.02; n=3: 4*0.03 = 0.12 ok; n=4: 5*0.8 = 4 no
    assert count_from_rule(conf, masked, "factor", 0.9, 1.0).tolist() == [3]
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"factor={bad} must be positive"):
            build_decoder("confidence", gen_length=4, steps=4, rule="factor", factor=bad)


def test_factor_rule_counts_n_plus_one_and_remasking_names_compare_by_value():
    """(n + 1)(1 − c_(n)) < f, not n(1 − c_(n)): cases where the two disagree; a remasking name
    from a parsed recipe (a fresh string) picks the same score as the literal."""
    from dlm.decode.confidence import scores

    conf = torch.tensor([[0.9, 0.6, 0.1], [0.99, 0.98, 0.7]])
    # row 0: n=2: 3·0.4 = 1.2 no (2·0.4 = 0.8 would pass); row 1: n=3: 4·0.3 = 1.2 no (2·0.3 would pass)
    assert count_from_rule(conf, torch.ones_like(conf, dtype=torch.bool), "factor", 0.9, 1.0).tolist() == [1, 2]
    logits, tokens = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)), torch.arange(5)
    for kind in ("random", "confidence", "margin", "entropy"):
        fresh = "".join(list(kind))
        a = scores(logits, tokens, kind, torch.Generator().manual_seed(1))
        b = scores(logits, tokens, fresh, torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rule_boundaries_are_fast_dllms_and_rule_names_compare_by_value():
    """At the boundary: a confidence equal to the threshold decodes (Fast-dLLM drops a token only
    below it), and the factor rule is strict ((n + 1)(1 − c_(n)) = f does not pass). The threshold
    and factor rules finish a block whatever ``steps`` says, and a rule named by a parsed recipe
    (a fresh string) decodes as the literal does."""
    every = torch.ones(1, 3, dtype=torch.bool)
    assert count_from_rule(torch.tensor([[0.5, 0.5, 0.25]]), every, "threshold", 0.5, 1.0).tolist() == [2]
    # n = 1: 2 · 0.25 = 0.5 < 0.75; n = 2: 3 · 0.25 = 0.75 is not below 0.75
    assert count_from_rule(torch.tensor([[0.75, 0.75, 0.5]]), every, "factor", 0.9, 0.75).tolist() == [1]
    model, prompt = tiny_model(), torch.randint(0, 63, (2, 3), generator=torch.Generator().manual_seed(2))
    for rule in ("schedule", "threshold", "factor"):
        outs = [
            build_decoder("confidence", gen_length=8, steps=steps, block_length=8, rule=name, threshold=0.5,
                          temperature=0.0, eos_token_id=None)(model, prompt)  # fmt: skip
            for name, steps in ((rule, 4), ("".join(list(rule)), 4), (rule, 2))  # schedule: 2 per step
        ]
        assert torch.equal(outs[0].tokens, outs[1].tokens), rule
        assert not (outs[2].generated == 63).any(), rule
        if rule != "schedule":  # the rule, not steps, says how many tokens a step decodes
            assert torch.equal(outs[0].tokens, outs[2].tokens) and outs[2].model_calls > 2, rule


def test_threshold_and_factor_default_to_fast_dllm_values():
    dec = build_decoder("confidence", gen_length=8, rule="threshold")
    assert (dec.threshold, dec.factor) == (0.9, 1.0)


def test_low_threshold_decodes_in_parallel_with_fewer_calls():
    model = tiny_model()
    dec = build_decoder("confidence", gen_length=32, steps=32, rule="threshold", threshold=0.0, temperature=0.0)
    out = dec(model, torch.randint(0, 63, (1, 3)))
    assert out.model_calls == 1 and not (out.generated == 63).any()


def test_batched_ragged_prompts_equal_single_prompts_at_temperature_zero():
    model = tiny_model()
    a, b = torch.randint(0, 63, (1, 6)), torch.randint(0, 63, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    pad = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    for kw in ({}, {"block_length": 4}, {"rule": "threshold", "threshold": 0.05}):
        dec = build_decoder("confidence", gen_length=8, steps=8, temperature=0.0, eos_token_id=None, **kw)
        both = dec(model, batch, attention_mask=pad)
        assert torch.equal(both.generated[0], dec(model, a).generated[0]), kw
        assert torch.equal(both.generated[1], dec(model, b).generated[0]), kw
        assert torch.equal(both.tokens[:, :6], batch)  # the prompt is never modified


class Plain(nn.Module):
    """Hides dlm's output_mask support: decoders fall back to slicing full-canvas logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("name", ["ancestral", "first_hitting", "confidence"])
def test_block_only_lm_head_equals_full_logits(name):
    model = tiny_model()
    prompt = torch.randint(0, 63, (3, 5))
    pad = torch.ones(3, 5, dtype=torch.long)
    pad[2, :2] = 0
    dec = build_decoder(name, gen_length=12, steps=6, block_length=4, eos_token_id=None)
    fast = dec(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(3))
    full = dec(Plain(model), prompt, attention_mask=pad, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fast.tokens, full.tokens) and torch.equal(fast.step_map, full.step_map)
    torch.testing.assert_close(fast.logprobs, full.logprobs)


def test_works_on_an_hf_model_with_logits_attribute():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).eval()
    for name in decoder_names():
        out = build_decoder(name, gen_length=8, steps=4, mask_token_id=39)(bert, torch.randint(0, 39, (2, 4)))
        assert out.tokens.shape == (2, 12) and not (out.generated == 39).any(), name


class EOSAt(nn.Module):
    """Predicts token 1 everywhere except EOS (2) at generation position 5."""

    def __init__(self, prompt_len: int):
        super().__init__()
        self.prompt_len, self.calls = prompt_len, 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, 8)
        logits[..., 1] = 5.0
        logits[:, self.prompt_len + 5, 2] = 10.0
        return logits


def test_stops_at_eos_and_fills_the_rest():
    model = EOSAt(prompt_len=2)
    dec = build_decoder(
        "confidence", gen_length=32, steps=32, block_length=8, mask_token_id=7, eos_token_id=2, temperature=0.0
    )
    out = dec(model, torch.zeros(2, 2, dtype=torch.long))
    gen = out.generated
    assert (gen[:, 5:] == 2).all() and (gen[:, :5] == 1).all()
    assert model.calls == 8  # only the first block was computed
    assert (out.step_map[:, 2 + 8 :] == -1).all()
    stop_dec = build_decoder(
        "confidence",
        gen_length=32,
        steps=32,
        block_length=8,
        mask_token_id=7,
        eos_token_id=None,
        temperature=0.0,
        stop=lambda g: (g == 1).sum(1) >= 12,
    )
    out = stop_dec(EOSAt(prompt_len=2), torch.zeros(1, 2, dtype=torch.long))
    assert (out.generated[:, 16:] == 7).all()  # stopped after block 2; no EOS known, rest left masked


class Spy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, input_ids, attention_mask=None):
        self.inputs.append(input_ids.clone())
        return self.inner(input_ids)


def test_classifier_free_guidance_masks_the_prompt_in_the_unconditional_branch():
    spy = Spy(tiny_model())
    dec = build_decoder("confidence", gen_length=4, steps=4, cfg_scale=1.5, temperature=0.0, mask_token_id=63)
    prompt = torch.randint(0, 63, (2, 3))
    dec(spy, prompt)
    first = spy.inputs[0]
    assert first.shape[0] == 4 and torch.equal(first[:2, :3], prompt) and (first[2:, :3] == 63).all()
    plain = build_decoder("confidence", gen_length=4, steps=4, temperature=0.0)(tiny_model(), prompt)
    zero = build_decoder("confidence", gen_length=4, steps=4, temperature=0.0, cfg_scale=0.0)(tiny_model(), prompt)
    assert torch.equal(plain.tokens, zero.tokens)


@torch.no_grad()
def test_classifier_free_guidance_decodes_the_argmax_of_un_plus_scale_plus_one_times_cond_minus_un():
    """cfg_scale = 1.5 at temperature 0, one token per step: each step decodes, among the masked
    positions, the most confident token of ``un + 2.5·(cond − un)`` (SUBS: mask logit −inf), with
    cond the canvas as is and un the canvas with the prompt masked, both from direct model calls."""
    model = tiny_model(seed=2)
    P, G = 5, 6
    prompt = torch.randint(0, 63, (4, P), generator=torch.Generator().manual_seed(2))
    kw = dict(gen_length=G, steps=G, temperature=0.0, eos_token_id=None)
    out = build_decoder("confidence", cfg_scale=1.5, **kw)(model, prompt)
    plain = build_decoder("confidence", **kw)(model, prompt)
    assert (out.generated != plain.generated).sum() >= 4  # guidance changes the answer: not vacuous

    def subs(logits):
        return logits.masked_fill(torch.arange(64) == 63, float("-inf"))

    other_scale_differs = False
    for s in range(G):
        x = out.canvas.masked_fill(out.step_map >= s, 63)  # the canvas step s decoded from
        cond = model(x).logits[:, P:]
        un = model(x.masked_fill(torch.arange(P + G) < P, 63)).logits[:, P:]
        guided = subs(un + 2.5 * (cond - un))
        now, tokens, masked = out.step_map[:, P:] == s, out.canvas[:, P:], x[:, P:] == 63
        assert (now.sum(1) == 1).all()
        assert torch.equal(tokens[now], guided.argmax(-1)[now]), s
        logp = torch.log_softmax(guided, -1)
        conf = logp.max(-1).values.masked_fill(~masked, float("-inf"))
        assert torch.equal(now.float().argmax(1), conf.argmax(1)), s  # the most confident position
        torch.testing.assert_close(out.logprobs[:, P:][now], logp.max(-1).values[now].double(), rtol=0, atol=1e-5)
        other_scale_differs |= bool((subs(un + 1.5 * (cond - un)).argmax(-1)[now] != tokens[now]).any())
    assert other_scale_differs  # the (s + 1) factor matters on this model: s alone picks other tokens


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(50, 30)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_categorical(logits, 1.0, g, top_k=1)[0], logits.argmax(-1))
    assert torch.equal(sample_categorical(logits, 1.0, g, top_p=1e-6)[0], logits.argmax(-1))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown decoder 'fhs'; known decoders: ancestral, confidence, first_hitting"):
        build_decoder("fhs", gen_length=8, steps=8)
    with pytest.raises(ValueError, match="has no setting 'treshold'.*Did you mean 'threshold'"):
        build_decoder("confidence", gen_length=8, steps=8, treshold=0.9)
    with pytest.raises(ValueError, match="block_length=5 does not divide gen_length=12.*e.g. 4"):
        build_decoder("confidence", gen_length=12, steps=12, block_length=5)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        build_decoder("ancestral", gen_length=8, steps=0)
    with pytest.raises(ValueError, match="steps=2 is fewer than the 4 blocks"):
        build_decoder("ancestral", gen_length=8, steps=2, block_length=2)
    with pytest.raises(ValueError, match="no mask token id"):
        build_decoder("confidence", gen_length=4, steps=4)(Constant(), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond the model's context of 128"):
        build_decoder("first_hitting", gen_length=100, steps=100)(tiny_model(), torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_token_id=99 is outside the model's vocabulary of 64"):
        build_decoder("ancestral", gen_length=4, steps=4, mask_token_id=99)(
            tiny_model(), torch.zeros(1, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="remasking='low'"):
        build_decoder("confidence", gen_length=4, steps=4, remasking="low")


def test_two_level_inverse_cdf_matches_a_flat_float64_cdf():
    from dlm.decode.sampling import CHUNK, inverse_cdf

    g = torch.Generator().manual_seed(0)
    for vocab in (7, CHUNK, 3 * CHUNK + 5):
        w = torch.rand(64, vocab, generator=g) ** 4
        w[:, ::3] = 0.0  # zero-weight tokens are never chosen
        u = torch.rand(64, generator=g, dtype=torch.float64)
        cdf = w.double().cumsum(-1)
        flat = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens, total = inverse_cdf(w, u)
        assert torch.equal(tokens, flat)
        torch.testing.assert_close(total, cdf[:, -1], rtol=1e-6, atol=0)  # chunk sums are float32 (pairwise)
        wide = torch.cat([torch.full((64, 5), 9.0), w, torch.full((64, 3), 9.0)], dim=1)
        view = wide[:, 5 : 5 + vocab]  # rows strided and offset: the chunk view must read only w's columns
        assert torch.equal(inverse_cdf(view, u)[0], flat)
        assert torch.equal(inverse_cdf(w.T.contiguous().T, u)[0], flat)  # column-major input
        for u_edge in (1 - 1e-17, 0.0):  # both ends of [0, 1): never a zero-weight token
            edge, _ = inverse_cdf(w, torch.full((64,), u_edge, dtype=torch.float64))
            assert (w.gather(1, edge[:, None]) > 0).all(), u_edge
        if vocab > CHUNK:  # a first chunk of zero weight: u = 0 must skip it, not land in it
            w0 = w.clone()
            w0[:, :CHUNK] = 0.0
            first, _ = inverse_cdf(w0, torch.zeros(64, dtype=torch.float64))
            assert (w0.gather(1, first[:, None]) > 0).all() and (first >= CHUNK).all()


def test_filters_keep_the_top_k_and_the_smallest_set_reaching_top_p():
    from dlm.decode.sampling import filter_logits

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # one row: top_k is compared with the vocab, not the rows
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, None)) == [0, 1]
    assert kept(filter_logits(logits, 100, None)) == [0, 1, 2, 3]  # more than the vocab: nothing dropped
    assert kept(filter_logits(logits, None, 0.7)) == [0, 1]  # mass before token 2 is 0.8 >= 0.7
    assert kept(filter_logits(logits, None, 0.81)) == [0, 1, 2]
    assert kept(filter_logits(logits[:, [3, 2, 1, 0]], None, 0.7)) == [2, 3]  # positions, not ranks
    halves = torch.tensor([[2.0, 1.0, 1.0]]).log()  # probabilities 0.5, 0.25, 0.25 (exact in binary)
    assert kept(filter_logits(halves, None, 0.75)) == [0, 1]  # the mass before token 2 reaches p exactly
    tail = torch.tensor([[0.0, -30.0, -40.0]])  # float32 cumulative mass is 1.0 before the tail tokens
    assert torch.equal(filter_logits(tail, None, 1.0), tail)  # top_p = 1 filters nothing


def test_first_hitting_k_per_call_decodes_everything_in_ceil_l_over_k_calls():
    dec = build_decoder("first_hitting", gen_length=10, steps=10, tokens_per_call=3, mask_token_id=7)
    out = dec(Constant(), torch.zeros(4, 2, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert not (out.generated == 7).any()
    assert (out.nfe == 4).all() and out.model_calls == 4  # ceil(10 / 3)
    assert all(sorted(torch.bincount(row[2:]).tolist()) == [1, 3, 3, 3] for row in out.step_map)


def test_first_hitting_k_per_call_records_k_successive_exact_first_hitting_times():
    """With k tokens per call the tokens come from one model output, but the times stay exact: the
    k positions of a call take k successive first-hitting times (n, n − 1, …, n − k + 1 masked), so
    the L times are still L iid U(0, 1) draws (loglinear, α_t = 1 − t), distinct within a call, and
    the largest belongs to the first call. KS at the 1% level."""
    n, length, k = 6000, 6, 3
    dec = build_decoder("first_hitting", gen_length=length, steps=length, tokens_per_call=k, mask_token_id=7)
    out = dec(Constant(), torch.zeros(n, 0, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    times, steps = out.times, out.step_map
    assert torch.isfinite(times).all() and (steps.max(1).values == 1).all()  # two calls of 3
    first_call = times.masked_fill(steps != 0, -1.0).sort(dim=1, descending=True).values[:, :k]
    assert (first_call[:, :-1] > first_call[:, 1:]).all()  # k different times in one call
    assert torch.equal(first_call[:, 0], times.max(1).values)
    later = times.masked_fill(steps == 0, 2.0).min(1).values
    assert (later < first_call[:, -1]).all()  # every later call is later in reverse time
    for sample, law in ((times.flatten(), lambda t: t), (times.max(1).values, lambda t: t**length)):
        d = ks_distance(sample, law)
        assert d < 1.63 / math.sqrt(len(sample)), d


def test_first_hitting_refuses_fewer_than_one_token_per_call():
    with pytest.raises(ValueError, match="tokens_per_call=0 must be >= 1"):
        build_decoder("first_hitting", gen_length=8, tokens_per_call=0)
