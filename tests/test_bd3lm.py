"""BD3-LM invariants (docs/objectives.md#bd3lm)."""

import math

import pytest
import torch

from conftest import tiny_model, tiny_recipe
from dlm.config import ConfigError, from_dict
from dlm.schedules import sample_times
from dlm.train.config import RecipeConfig
from dlm.train.objectives import build_objective, paired_logits_from, subs_log_probs
from dlm.train.objectives.bd3lm import bd3lm_inputs

MASK = 63


def vectorised_logits(model, x0, zt, block):
    inputs, positions, attn = bd3lm_inputs(x0, zt, block)
    shift = paired_logits_from(model, x0.shape[1], block, x0.device)  # a shifted model's block starts
    return model(inputs, attention_mask=attn, position_ids=positions, **shift).logits[:, : x0.shape[1]]


def per_block_logits(model, x0, zt, block):
    """Reference: for each block b, run [x^{<b}, z_t^b] with block-causal attention."""
    L = x0.shape[1]
    out = []
    for start in range(0, L, block):
        inp = torch.cat([x0[:, :start], zt[:, start : start + block]], dim=1)
        out.append(model(inp, attn_mode="block_causal", block_size=block).logits[:, start:])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("block", [1, 2, 4, 12])
@pytest.mark.parametrize("shift", [False, True], ids=["unshifted", "shifted"])
def test_vectorised_logits_equal_a_per_block_loop(block, shift):
    model = tiny_model(logits_shift=shift)  # shifted: an AR checkpoint adapted to block diffusion
    x0 = torch.randint(0, MASK, (3, 12))
    zt = torch.where(torch.rand(3, 12) < 0.5, torch.full_like(x0, MASK), x0)
    torch.testing.assert_close(
        vectorised_logits(model, x0, zt, block), per_block_logits(model, x0, zt, block), atol=1e-5, rtol=1e-5
    )


def test_block_equal_to_length_is_mdlm():
    model = tiny_model()
    x0 = torch.randint(0, MASK, (4, 16))
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=16)
    noise = bd3.sample_noise((4, 16), torch.Generator().manual_seed(0))
    mdlm = build_objective("mdlm", mask_token_id=MASK)
    # MDLM masks where u < p: u = 0 on BD3's masked positions and 1 elsewhere reproduces its mask
    mdlm_noise = {"t": noise["t"][:, 0], "u": (~noise["masked"]).float()}
    a = bd3.loss(model, {"input_ids": x0}, noise)
    b = mdlm.loss(model, {"input_ids": x0}, mdlm_noise)
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-5)
    assert a.count == b.count


def test_block_one_fully_masked_is_the_autoregressive_nll():
    model = tiny_model()
    x0 = torch.randint(0, MASK, (2, 10))
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=1, schedule_args={"eps": 0.0})
    noise = {"t": torch.ones(2, 10), "masked": torch.ones(2, 10, dtype=torch.bool)}  # w(1) = 1
    total = bd3.loss(model, {"input_ids": x0}, noise).total
    ar_nll = 0.0
    for l in range(10):  # −log p(x_l | x_<l), the model's own autoregressive factorisation
        inp = torch.cat([x0[:, :l], torch.full((2, 1), MASK)], dim=1)
        logp = subs_log_probs(model(inp, attn_mode="block_causal", block_size=1).logits[:, -1], MASK)
        ar_nll = ar_nll - logp.gather(-1, x0[:, l : l + 1]).sum()
    torch.testing.assert_close(total, ar_nll, rtol=1e-5, atol=1e-4)


def test_clipped_masks_stay_within_the_range_per_block():
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=16, clip_low=0.3, clip_high=0.8)
    noise = bd3.sample_noise((64, 128), torch.Generator().manual_seed(0))
    frac = noise["masked"].view(64, 8, 16).float().mean(-1)
    assert frac.min() >= 0.3 - 1e-6 and frac.max() <= 0.8 + 1e-6
    rate = 1 - bd3.schedule.alpha(noise["t"])
    assert rate.min() >= 0.3 - 1e-3 and rate.max() <= 0.8 + 1e-3
    full = bd3.sample_noise((64, 128), torch.Generator().manual_seed(0), for_eval=True)  # reporting: U[0, 1]
    full_frac = full["masked"].view(64, 8, 16).float().mean(-1)
    assert full_frac.min() < 0.3 and full_frac.max() > 0.8


def test_clipped_rates_are_uniform_and_counts_follow_the_conditioned_binomial():
    """BD3-LM's clipped schedule: each block's mask rate p ~ U[β, ω] (t from it, never above 1),
    and its mask count is Binomial(B, p) conditioned on k/B in [β, ω] (blocks outside are redrawn).
    Blocks of 4, [0.25, 0.5]: k ∈ {1, 2}; P(k = 2) = E_p[P₂(p) / (P₁(p) + P₂(p))] by quadrature."""
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=4, clip_low=0.25, clip_high=0.5)
    noise = bd3.sample_noise((2000, 64), torch.Generator().manual_seed(0))
    rate = (1 - bd3.schedule.alpha(noise["t"].double())).flatten()
    s = ((rate - 0.25) / 0.25).sort().values  # U(0, 1) if the rate is uniform on [β, ω]
    hi = torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
    assert torch.maximum(hi - s, s - (hi - 1 / len(s))).max() < 1.63 / math.sqrt(len(s))  # KS, 1%
    counts = noise["masked"].view(-1, 4).sum(-1)
    assert set(counts.unique().tolist()) == {1, 2}
    p = torch.linspace(0.25, 0.5, 100001, dtype=torch.float64)
    p1, p2 = 4 * p * (1 - p) ** 3, 6 * p**2 * (1 - p) ** 2
    exact = (p2 / (p1 + p2)).mean().item()
    se = math.sqrt(exact * (1 - exact) / len(counts))
    assert abs((counts == 2).double().mean().item() - exact) < 4 * se
    near_one = build_objective("bd3lm", mask_token_id=MASK, block_size=4, clip_low=0.5, clip_high=1.0)
    assert near_one.sample_noise((64, 64), torch.Generator().manual_seed(0))["t"].max() <= 1.0  # ε > 0: 1/(1 − ε) > 1


def test_a_clip_range_starting_at_zero_still_clips():
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=4, clip_low=0.0, clip_high=0.5)
    frac = bd3.sample_noise((256, 64), torch.Generator().manual_seed(0))["masked"].view(-1, 4).float().mean(-1)
    assert frac.max() <= 0.5


def test_clip_feasibility_is_inclusive_at_both_ends():
    from dlm.train.objectives.bd3lm import clip_is_feasible

    assert clip_is_feasible(5, 0.9, 1.0)  # only k = 5 (all masked)
    assert clip_is_feasible(4, 0.25, 0.3) and clip_is_feasible(4, 0.2, 0.25)  # k = 1 at either end
    assert not clip_is_feasible(4, 0.3, 0.45) and not clip_is_feasible(5, 0.85, 0.95)
    build_objective("bd3lm", mask_token_id=MASK, block_size=5, clip_low=0.9, clip_high=1.0)
    for low, high in ((0.5, 0.5), (0.8, 0.3), (-0.5, 0.5), (0.2, 1.5)):
        with pytest.raises(ConfigError, match="need 0 <= low < high <= 1"):
            build_objective("bd3lm", mask_token_id=MASK, block_size=4, clip_low=low, clip_high=high)


def test_clip_counts_are_exact_at_fractions_that_floats_round():
    from dlm.train.objectives.bd3lm import clip_counts

    assert 0.28 * 25 > 7 and 0.56 * 25 > 14  # 7.000000000000001: a plain ceil would give 8
    assert clip_counts(25, 0.28, 0.56) == (7, 14) and clip_counts(10, 0.3, 0.7) == (3, 7)
    assert clip_counts(4, 0.25, 0.5) == (1, 2) and clip_counts(4, 0.0, 1.0) == (0, 4)
    assert clip_counts(4, 0.3, 0.45) == (2, 1)  # empty
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=25, clip_low=0.28, clip_high=0.56)
    counts = bd3.sample_noise((512, 50), torch.Generator().manual_seed(0))["masked"].view(-1, 25).sum(-1)
    assert counts.min() == 7 and counts.max() == 14  # both ends reachable, nothing outside


def test_redrawing_masks_stops_after_its_bound_with_a_clear_error():
    """A block that can never reach its range (mask rate 0, at least one token wanted) is redrawn
    exactly 200 times (the documented bound), then the error says so."""
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=4, clip_low=0.25, clip_high=0.5)
    g, twin = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="could not draw masks within \\[0.25, 0.5\\] in 200 rounds"):
        bd3._resample(torch.zeros(2, 8, dtype=torch.bool), torch.zeros(2, 8), g)
    for _ in range(200):
        torch.rand(2, 8, generator=twin)
    assert torch.equal(g.get_state(), twin.get_state())  # exactly that many redraws


def test_default_block_times_lie_in_t_eps_one():
    t = build_objective("bd3lm", mask_token_id=MASK, block_size=4).sample_noise((64, 64), torch.Generator())["t"]
    assert t.min() >= 1e-3 and t.max() <= 1.0


def test_per_block_times_are_antithetic_over_all_blocks():
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=4, t_eps=0.0)
    t = bd3.sample_noise((8, 16), torch.Generator().manual_seed(1))["t"]  # 8 x 4 block times
    assert torch.equal(torch.sort((t.flatten() * 32).floor().long()).values, torch.arange(32))


def test_each_block_is_masked_at_the_rate_of_its_own_time():
    """Reproduce sample_noise's draws (block times, then one uniform per token): token l is masked
    iff u_l < 1 − α(t_b) for its own block b = l // B, with 4 unequal times per row (``repeat``
    instead of ``repeat_interleave`` would pair token l with block l mod 4)."""
    G, L, block = 3, 16, 4
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=block)
    noise = bd3.sample_noise((G, L), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = sample_times(G * L // block, g, bd3.t_eps, True).view(G, L // block)
    u = torch.rand(G, L, generator=g)
    own = torch.arange(L) // block
    assert torch.equal(noise["t"], t)
    assert torch.equal(noise["masked"], u < (1 - bd3.schedule.alpha(t))[:, own])
    assert not torch.equal(noise["masked"], u < (1 - bd3.schedule.alpha(t)).repeat(1, block))  # not vacuous


@torch.no_grad()
def test_each_block_is_weighted_by_its_own_time():
    """BD3-LM loss = Σ_b w(t_b) Σ_{masked l in b} −log p(x^l | z_t^b, x^{<b}) with w(t) = 1/t
    (loglinear), t differing per block, against the per-block reference logits."""
    model = tiny_model()
    block = 2
    x0 = torch.randint(0, MASK, (2, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([[0.05, 0.9, 0.3, 0.7], [0.9, 0.1, 0.6, 0.2]])
    masked = torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) < 0.6
    masked[:, ::2] = True  # every block has a masked token
    bd3 = build_objective("bd3lm", mask_token_id=MASK, block_size=block)
    total = bd3.loss(model, {"input_ids": x0}, {"t": t, "masked": masked}).total
    zt = torch.where(masked, torch.full_like(x0, MASK), x0)
    nll = -subs_log_probs(per_block_logits(model, x0, zt, block), MASK).gather(-1, x0[..., None]).squeeze(-1)
    own = torch.arange(8) // block
    expected = ((1 / t[:, own]) * nll * masked).sum()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    wrong = ((1 / t.repeat(1, block)) * nll * masked).sum()  # token l paired with block l mod 4
    assert (wrong - expected).abs() > 1e-3 * expected  # 100x the tolerance: the pairing matters, not vacuous


def test_bad_block_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="block_size=5 must be a positive divisor of data.seq_len=256"):
        from_dict(RecipeConfig, {"objective": "bd3lm", "diffusion": {"block_size": 5}})
    for block in (None, 0, -2):
        with pytest.raises(ConfigError, match="needs diffusion.block_size"):
            build_objective("bd3lm", mask_token_id=MASK, block_size=block)
    with pytest.raises(ConfigError, match="no mask count k gives k/1 in"):
        build_objective("bd3lm", mask_token_id=MASK, block_size=1, clip_low=0.3, clip_high=0.8)
    with pytest.raises(ConfigError, match="does not divide data.seq_len=10"):
        build_objective("bd3lm", mask_token_id=MASK, block_size=4).sample_noise((2, 10), torch.Generator())


def test_bd3lm_trains_and_exports_a_block_causal_model(tmp_path):
    from transformers import AutoModel

    from dlm.train.loop import main

    cfg = tiny_recipe(
        tmp_path,
        objective="bd3lm",
        diffusion={"block_size": 8, "clip_low": 0.3, "clip_high": 0.8},
        sample={"num_samples": 1, "gen_length": 12, "steps": 4},
    )
    result = main(cfg)
    assert result.bound == "nelbo" and 1 < result.val_ppl < 1e4
    loaded = AutoModel.from_pretrained(result.output_dir / "final")
    assert loaded.config.attention_mode == "block_causal" and loaded.config.block_size == 8
    assert result.samples  # decoded block by block (12 rounded up to 16 tokens)
