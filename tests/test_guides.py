"""Reward-guided decoding (docs/guided-decoding.md) against its targets.

An oracle denoiser built from a known joint ``p`` over V^L short sequences and a token-level
reward ``r`` make the tilted target ``q ∝ p·exp(r/α)`` and the exact soft values
``v*(z) = α·log E_{p(x|z)} exp(r(x)/α)`` computable by enumeration. A guided sampler passes when
its samples are as close to q (total variation) as an exact sampler of q with as many samples,
and a χ² test does not reject.
"""

import itertools
import math

import pytest
import torch

from conftest import REPEAT_SFT, tiny_model
from dlm.decode import build_decoder
from dlm.decode.blocks import Decoding
from dlm.decode.guides import build_guide, guide_names
from dlm.decode.guides.base import GuideError, effective_sample_size, final_text, resample
from oracle import MASK, L, Oracle, V, chi2_ok, empirical, make_joint

SEQS, PROBS = make_joint()
ALPHA = 1.0
N = 4000
WEIGHT = V ** torch.arange(L - 1, -1, -1)
CANVAS_WEIGHT = (V + 1) ** torch.arange(L - 1, -1, -1)


def token_reward(tokens: torch.Tensor) -> torch.Tensor:
    """A reward over sequences: zeros are good, a leading 3 is bad."""
    return 0.6 * (tokens == 0).sum(-1).double() - 0.5 * (tokens[:, 0] == 3).double()


def tilted(alpha: float = ALPHA) -> torch.Tensor:
    q = PROBS * torch.exp(token_reward(SEQS) / alpha)
    return q / q.sum()


Q = tilted()


def exact_soft_values(alpha: float = ALPHA) -> torch.Tensor:
    """v*(z) for every canvas z in (V+1)^L (mask = V): α·log E_{p(x | unmasked z)} exp(r(x)/α)."""
    canvases = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))
    agree = ((canvases[:, None, :] == SEQS[None]) | (canvases[:, None, :] == MASK)).all(-1).double()
    tilt = torch.exp(token_reward(SEQS) / alpha)
    return alpha * torch.log((agree * PROBS * tilt).sum(1) / (agree * PROBS).sum(1))


V_STAR = exact_soft_values()


def exact_value(canvas: torch.Tensor, mask_id: int) -> torch.Tensor:
    assert mask_id == MASK
    return V_STAR[(canvas * CANVAS_WEIGHT).sum(-1)]


def tv(freq: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (freq - probs).abs().sum().item()


def exact_sampler_tv(probs: torch.Tensor, n: int, seed: int = 11) -> float:
    draws = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return tv(torch.bincount(draws, minlength=len(probs)).double() / n, probs)


def assert_samples(tokens: torch.Tensor, target: torch.Tensor, what: str) -> None:
    freq = empirical(tokens)
    ok, stat = chi2_ok(freq, target, len(tokens))
    ref = exact_sampler_tv(target, len(tokens))
    assert ok and tv(freq, target) < 1.5 * ref, (what, stat, tv(freq, target), ref)


def fhs(**kw):
    return build_decoder("first_hitting", gen_length=L, steps=L, mask_token_id=MASK, eos_token_id=None, **kw)


def run(guide, n=N, seed=1, decoder=None, **kw):
    return guide(
        decoder or fhs(),
        Oracle(SEQS, PROBS),
        torch.zeros(n, 0, dtype=torch.long),
        reward=kw.pop("reward", token_reward),
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def test_the_tilted_target_is_far_from_the_base_distribution():
    assert tv(PROBS, Q) > 0.25  # otherwise the tests below could not tell a guide from no guide


def test_smc_reproduces_the_tilted_target():
    out = run(build_guide("smc", particles=64, alpha=ALPHA))
    assert out.resamples > 0  # the resampling path ran
    assert_samples(out.tokens, Q, "smc")
    assert out.particles.shape == (N, 64, L) and torch.isfinite(out.log_weights).all()
    assert torch.allclose(out.log_weights.logsumexp(1), torch.zeros(N, dtype=torch.float64))
    # NFE honestly counted: every particle's decoder calls (L each) and its greedy-completion values
    assert (out.decode_nfe == 64 * L).all() and (out.value_nfe > 0).all()
    assert (out.nfe == out.decode_nfe + out.value_nfe).all()


def test_smc_reproduces_the_tilted_target_of_texts_that_stop_at_eos():
    """Token 3 is EOS and blocks hold 2 tokens: a row whose first block has an EOS is finished there
    and reads EOS after it. The target is the tilt of the *text* distribution, and the weight of a
    row finished at a block end comes from its text's reward, not from the value it had before
    (here a value that knows nothing: SMC is consistent whatever the value)."""
    eos = 3
    texts = final_text(SEQS, eos, MASK)
    index = (texts * WEIGHT).sum(-1)
    p_text = torch.zeros(V**L, dtype=torch.float64).index_add_(0, index, PROBS)
    q_text = torch.zeros(V**L, dtype=torch.float64).index_add_(0, index, PROBS * torch.exp(token_reward(texts)))
    q_text /= q_text.sum()
    assert tv(p_text, q_text) > 0.25
    decoder = build_decoder(
        "first_hitting", gen_length=L, steps=L, block_length=2, mask_token_id=MASK, eos_token_id=eos
    )
    out = run(
        build_guide("smc", particles=64, alpha=ALPHA),
        decoder=decoder,
        value=lambda canvas, mask_id: torch.zeros(len(canvas)),
    )
    assert ((out.tokens[:, :2] == eos).any(1)).float().mean() > 0.1  # many rows finished in their first block
    assert_samples(out.tokens, q_text, "smc with eos")


def test_smc_with_the_exact_soft_value_reproduces_the_tilted_target():
    out = run(build_guide("smc", particles=64, alpha=ALPHA), value=exact_value)
    assert_samples(out.tokens, Q, "smc with v*")
    assert (out.value_nfe == 0).all()  # a user value costs no model call


def test_svdd_with_exact_soft_values_and_many_candidates_reproduces_the_tilted_target():
    out = run(build_guide("svdd", particles=1, candidates=64, alpha=ALPHA), value=exact_value)
    assert_samples(out.tokens, Q, "svdd")
    # the 64 candidates of a particle share its model call: L decoder evaluations per prompt
    assert (out.decode_nfe == L).all()


def test_dts_sampling_mode_reproduces_the_tilted_target():
    # one tree per prompt: many rollouts, then N final descents. Draws grow with visits
    # (widen_power 1: half the visits draw a new child), so every node's kernel estimate converges.
    guide = build_guide("dts", rollouts=60_000, parallel=2048, alpha=ALPHA, widen=0.5, widen_power=1.0, samples=N)
    out = run(guide, n=1)
    assert_samples(out.particles[0], Q, "dts")
    # selections ride along without model calls: fewer evaluations than rollouts x L
    assert 0 < int(out.decode_nfe[0]) < 60_000 * L


def test_dts_search_mode_finds_the_best_sequence_with_fewer_evaluations_than_best_of_n():
    out = run(build_guide("dts", rollouts=2048, parallel=64, mode="search", samples=3), n=4)
    rewards = token_reward(SEQS)
    best = rewards.max().item()
    assert torch.allclose(out.reward, torch.full((4,), best, dtype=torch.float64))
    # the samples are the best distinct leaves, best first, and their rewards are what they score
    assert (out.particle_rewards[:, :-1] >= out.particle_rewards[:, 1:]).all()
    assert torch.allclose(token_reward(out.particles.flatten(0, 1)).double(), out.particle_rewards.flatten())
    # best-of-N needs n with 1 − (1 − p*)^n ≥ 0.95 samples of L evaluations to find it as reliably
    p_best = PROBS[rewards == best].sum().item()
    n95 = math.log(0.05) / math.log(1 - p_best)
    assert (out.decode_nfe < n95 * L).all(), (out.decode_nfe, n95 * L)


def test_best_of_n_does_not_sample_the_tilted_target():
    out = run(build_guide("best_of_n", particles=16))
    freq = empirical(out.tokens)
    # it piles onto high rewards: further from q than an exact sampler by far, with a higher mean reward
    assert tv(freq, Q) > 4 * exact_sampler_tv(Q, N)
    assert out.reward.mean() > (Q * token_reward(SEQS)).sum() + 0.3
    assert torch.equal(out.reward, out.particle_rewards.max(dim=1).values)


@pytest.mark.parametrize("name", ["smc", "svdd", "dts"])
def test_a_huge_alpha_recovers_the_decoders_own_distribution(name):
    guide = {
        "smc": build_guide("smc", particles=8, alpha=1e9),
        "svdd": build_guide("svdd", candidates=8, alpha=1e9),
        "dts": build_guide("dts", rollouts=20_000, parallel=2048, alpha=1e9, widen=0.5, widen_power=1.0, samples=N),
    }[name]
    out = run(guide, n=1 if name == "dts" else N)
    assert_samples(out.particles[0] if name == "dts" else out.tokens, PROBS, name)


def test_smc_with_one_particle_is_the_decoder_itself():
    decoder = fhs(temperature=1.0)
    plain = decoder(
        Oracle(SEQS, PROBS), torch.zeros(64, 0, dtype=torch.long), generator=torch.Generator().manual_seed(5)
    )
    out = run(build_guide("smc", particles=1), n=64, seed=5, decoder=decoder)
    assert torch.equal(out.tokens, plain.tokens) and out.resamples == 0


@pytest.mark.parametrize("name", ["smc", "svdd", "best_of_n", "dts"])
def test_log_weights_stay_finite_with_rewards_of_ten_thousand(name):
    def huge(tokens):
        return 1e4 * ((tokens == 0).sum(-1).double() - 2.0)

    settings = {"dts": {"rollouts": 64, "parallel": 32}, "svdd": {"alpha": 1.0}}.get(name, {})
    out = run(build_guide(name, **settings), n=16, reward=huge)
    assert torch.isfinite(out.reward).all() and not torch.isnan(out.log_weights).any()
    assert torch.allclose(out.log_weights.logsumexp(1), torch.zeros(16, dtype=torch.float64))
    assert (out.tokens != MASK).all()


def test_edlm_with_the_exact_joint_as_energy_reproduces_the_joint_in_one_parallel_step():
    logp = PROBS.log()

    def energy(tokens):
        return logp[(tokens * WEIGHT).sum(-1)]

    one_step = build_decoder("ancestral", gen_length=L, steps=1, mask_token_id=MASK, eos_token_id=None)
    plain = one_step(
        Oracle(SEQS, PROBS), torch.zeros(N, 0, dtype=torch.long), generator=torch.Generator().manual_seed(2)
    )
    assert tv(empirical(plain.tokens), PROBS) > 0.4  # every position at once: the product of the marginals
    out = build_guide("edlm", candidates=256)(
        one_step,
        Oracle(SEQS, PROBS),
        torch.zeros(N, 0, dtype=torch.long),
        energy=energy,
        generator=torch.Generator().manual_seed(2),
    )
    assert_samples(out.tokens, PROBS, "edlm")
    assert (out.energy_nfe == 256).all() and (out.decode_nfe == 1).all()  # one model call, 256 energies


def test_edlm_only_in_the_first_steps_leaves_later_steps_alone():
    calls = []

    def energy(tokens):
        calls.append(len(tokens))
        return torch.zeros(len(tokens), dtype=torch.float64)

    decoder = build_decoder("ancestral", gen_length=L, steps=L, mask_token_id=MASK, eos_token_id=None)
    out = build_guide("edlm", candidates=4, steps=1)(
        decoder,
        Oracle(SEQS, PROBS),
        torch.zeros(8, 0, dtype=torch.long),
        energy=energy,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(calls) <= 1 and (out.tokens != MASK).all()


# --- the stepper the guides drive ----------------------------------------------------------------


def ragged_prompts():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    return ids, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize(
    "decoder,cache,block",
    [
        ("confidence", "none", None),
        ("confidence", "dual", None),
        ("confidence", "prefix", None),
        ("confidence", "delayed", None),
        ("confidence", "exact", 4),
        ("threshold", "dual", None),
    ],
)
def test_reindexed_rows_continue_as_the_rows_they_copy(decoder, cache, block):
    """Greedy decoding of two ragged prompts, rows swapped (then one duplicated) mid-way: every
    row ends as the row it became would have ended alone — canvas, cached logits, KV cache and
    policy state all follow their row."""
    kw = {"attention_mode": "block_causal", "block_size": block} if block else {}
    model = tiny_model(**kw)
    with torch.no_grad():  # sharper logits: a random tiny model's confidences lie within float noise of each
        model.norm.weight.mul_(5.0)  # other, and the rows' order in a batch moves logits by ~1e-7
    ids, pad = ragged_prompts()
    rule = {"rule": "threshold", "threshold": 0.05} if decoder == "threshold" else {}
    dec_cfg = build_decoder("confidence", gen_length=16, steps=16, block_length=8, temperature=0.0, cache=cache, **rule)
    plain = dec_cfg(model, ids, attention_mask=pad)
    for index, expect in (([1, 0], [1, 0]), ([0, 0], [0, 0]), ([1, 1], [1, 1])):
        dec = Decoding(dec_cfg, dec_cfg.make_policy(), model, ids, pad, None)
        for _ in range(5):  # into the first block
            assert dec.advance()
        dec.reindex(torch.tensor(index))
        while dec.advance():
            pass
        out = dec.output()
        assert torch.equal(out.tokens[:, -16:], plain.tokens[expect, -16:]), (index, cache)
        # decode-time log-probs see every logit: a row reading another row's K/V would show here
        torch.testing.assert_close(out.logprobs[:, -16:], plain.logprobs[expect, -16:], rtol=0, atol=1e-6)


def test_policies_carry_their_row_state_through_a_reindex():
    from dlm.decode.confidence import ConfidencePolicy
    from dlm.decode.first_hitting import FirstHittingPolicy

    masked = torch.tensor([[True] * 4, [False] * 4, [True, True, False, False]])
    policy = ConfidencePolicy(build_decoder("confidence", gen_length=4, steps=4))
    policy.start_block(masked, 2, None)
    before = policy.counts.clone()
    policy.reindex(torch.tensor([2, 2, 0]))
    assert torch.equal(policy.counts, before[[2, 2, 0]])
    fh = FirstHittingPolicy(build_decoder("first_hitting", gen_length=4, steps=4))
    fh.start_block(masked, 4, None)
    fh.tau = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    fh.reindex(torch.tensor([1, 0, 0]))
    assert fh.tau.tolist() == [0.2, 0.1, 0.1]


def test_a_first_hitting_row_without_masked_positions_keeps_its_time():
    """A row with nothing to decode this step (held back by a guide's ``active``, or done) keeps its
    time: the continuous-time chain only moves when a position of that row unmasks."""
    from dlm.decode.blocks import BlockState
    from dlm.decode.first_hitting import FirstHittingPolicy

    cfg = build_decoder("first_hitting", gen_length=4, steps=4, tokens_per_call=2)
    fh = FirstHittingPolicy(cfg)
    masked = torch.tensor([[True] * 4, [False] * 4, [True, False, False, False]])
    fh.start_block(masked, 4, None)
    state = BlockState(torch.zeros(3, 4, dtype=torch.long), 0, masked, 0, 4, lambda want: torch.zeros(int(want.sum()), 8))
    decode, _, _ = fh.step(state, torch.Generator().manual_seed(0))
    assert decode.sum(1).tolist() == [2, 0, 1]
    assert fh.tau[1] == 1.0 and 0.0 < fh.tau[0] < 1.0 and 0.0 < fh.tau[2] < 1.0
    assert not torch.isnan(fh.last_times[decode]).any()  # every unmasked position has its hitting time


@pytest.mark.parametrize("name", ["best_of_n", "smc", "svdd", "dts", "edlm"])
def test_guided_decoding_builds_no_autograd_graph(name):
    """Guides drive the decoding loop step by step: every model call (and the energy's) must run
    without autograd, or each step's graph keeps its activations alive (EDLM over 64 samples of
    the quickstart model grew past 20 GB that way)."""
    model, energy_model = tiny_model(), tiny_model(seed=1)
    grad_modes = []
    for m in (model, energy_model):
        m.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    cfg = build_decoder("ancestral", gen_length=8, steps=2, temperature=1.0, mask_token_id=63)
    settings = {"dts": {"rollouts": 4, "parallel": 2}}.get(name, {})
    kwargs = {"energy": energy_model} if name == "edlm" else {"reward": lambda tokens: (tokens == 5).sum(-1).double()}
    out = build_guide(name, **settings)(cfg, model, torch.tensor([[3, 4, 5]]).repeat(2, 1), **kwargs)
    assert grad_modes and not any(grad_modes), f"{sum(grad_modes)} of {len(grad_modes)} model calls built a graph"
    assert not out.tokens.requires_grad


def test_shared_groups_run_the_model_once_per_group():
    model = tiny_model()
    seen = []
    original = model.forward

    def counting(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.forward = counting
    cfg = build_decoder("confidence", gen_length=8, steps=8, temperature=0.0)
    ids = torch.tensor([[3, 4, 5]]).repeat(6, 1)
    dec = Decoding(cfg, cfg.make_policy(), model, ids, None, None, shared=3)
    while dec.advance():
        pass
    assert set(seen) == {2} and (dec.logits.nfe.view(2, 3) == torch.tensor([8, 0, 0])).all()
    model.forward = original
    assert torch.equal(dec.output().tokens, cfg(model, ids).tokens)


def test_a_shared_group_that_differs_at_a_model_call_is_an_error():
    cfg = build_decoder("confidence", gen_length=4, steps=4)
    dec = Decoding(cfg, cfg.make_policy(), tiny_model(), torch.tensor([[3], [4]]), None, None, shared=2)
    with pytest.raises(RuntimeError, match="shared group"):
        dec.advance()


def test_ess_and_resampling_in_log_space():
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e4, -1e4, -1e4, -1e4]], dtype=torch.float64)
    assert torch.allclose(effective_sample_size(log_w), torch.tensor([4.0, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    assert (resample(log_w[1:], g, "systematic") == 0).all() and (resample(log_w[1:], g, "multinomial") == 0).all()
    # systematic resampling keeps each ancestor floor/ceil(K·w) times
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64).log()
    counts = torch.bincount(resample(w, g, "systematic")[0], minlength=4)
    assert counts.tolist() == [2, 1, 0, 1] or counts.tolist() == [2, 1, 1, 0]


# --- bad input ----------------------------------------------------------------------------------


def test_bad_guides_and_settings_are_clear_errors():
    assert guide_names() == ["best_of_n", "dts", "edlm", "smc", "svdd"]
    with pytest.raises(ValueError, match="unknown guide 'smcc'.*known guides: best_of_n.*Did you mean 'smc'"):
        build_guide("smcc")
    with pytest.raises(ValueError, match="particles=0 must be >= 1"):
        build_guide("smc", particles=0)
    with pytest.raises(ValueError, match="alpha=-1.0 must be > 0"):
        build_guide("smc", alpha=-1.0)
    with pytest.raises(ValueError, match="alpha=-0.5 must be >= 0"):
        build_guide("svdd", alpha=-0.5)
    with pytest.raises(ValueError, match="has no setting 'particle'.*Did you mean 'particles'"):
        build_guide("smc", particle=4)
    with pytest.raises(ValueError, match="mode='best'; choose one of sample, search"):
        build_guide("dts", mode="best")


@pytest.mark.parametrize(
    "reward,match",
    [
        (lambda t: torch.zeros(len(t), 2), r"shape \[8\]; got shape \[8, 2\]"),
        (lambda t: torch.full((len(t),), float("nan")), "non-finite"),
        (lambda t: "high", "must return a tensor of 8 numbers"),
    ],
)
def test_a_reward_of_the_wrong_shape_or_not_finite_is_named(reward, match):
    with pytest.raises(GuideError, match=match):
        run(build_guide("best_of_n", particles=2), n=4, reward=reward)


def test_a_text_reward_needs_its_tokenizer():
    with pytest.raises(GuideError, match=r"as_reward\('answer_tags', tokenizer, prompts"):
        run(build_guide("smc", particles=2), n=2, reward="answer_tags")


# --- command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import train_tiny

    return train_tiny(tmp_path_factory.mktemp("guided"))


@pytest.mark.parametrize(
    "extra",
    [
        ["--guide", "best_of_n", "--particles", "3"],
        ["--guide", "smc", "--particles", "3", "--alpha", "0.5"],
        ["--guide", "svdd", "--candidates", "3"],
        ["--guide", "dts", "--rollouts", "4", "--dts-mode", "search"],
    ],
)
def test_generate_with_a_guide_prints_each_sample_with_its_reward_and_nfe(trained, capsys, extra):
    from dlm.cli import main as cli_main

    argv = ["generate", trained, "--prompt", "the model", "--prompt", "def", "--gen-length", "8", "--block-length", "4"]
    assert cli_main([*argv, "--reward", "tests_rewards:variety", *extra]) == 0
    out = capsys.readouterr().out
    assert out.count("=== 'the model' (") == 1 and out.count("=== 'def' (") == 1
    assert "reward " in out and "NFE " in out


def test_generate_with_edlm_uses_a_causal_energy_model_with_the_same_tokenizer(trained, tmp_path, capsys):
    from conftest import train_tiny
    from dlm.cli import main as cli_main

    ar = train_tiny(tmp_path, objective="ar")  # same corpus and tokenizer recipe: the same vocabulary
    argv = ["generate", trained, "--prompt", "the model", "--gen-length", "8", "--steps", "2"]
    assert cli_main([*argv, "--guide", "edlm", "--energy", ar, "--candidates", "4"]) == 0
    assert "(edlm: reward nan, NFE " in capsys.readouterr().out


def test_guide_options_are_checked(trained, tmp_path, capsys):
    from dlm.cli import main as cli_main

    base = ["generate", trained, "--gen-length", "8"]
    assert cli_main([*base, "--guide", "smc"]) == 2
    assert "--guide smc needs --reward NAME" in capsys.readouterr().err
    assert cli_main([*base, "--guide", "smc", "--reward", "answer_tags", "--rollouts", "4"]) == 2
    assert "--rollouts does not apply to --guide smc" in capsys.readouterr().err
    assert cli_main([*base, "--guide", "smc", "--reward", "nosuch"]) == 2
    assert "unknown reward 'nosuch'" in capsys.readouterr().err
    assert cli_main([*base, "--guide", "smc", "--reward", "answer_tags", "--particles", "0"]) == 2
    assert "particles=0 must be >= 1" in capsys.readouterr().err
    assert cli_main([*base, "--guide", "edlm"]) == 2
    assert "--guide edlm needs --energy CHECKPOINT" in capsys.readouterr().err
    assert cli_main([*base, "--guide", "smc", "--reward", "tests_rewards:short"]) == 2
    assert "returned 1 values for" in capsys.readouterr().err


def test_an_energy_model_with_another_tokenizer_is_refused(trained, tmp_path, capsys):
    from conftest import train_tiny
    from dlm.cli import main as cli_main

    other = train_tiny(tmp_path, tokenizer={"vocab_size": 280})  # another BPE: other ids
    argv = ["generate", trained, "--gen-length", "8", "--guide", "edlm", "--energy", other]
    assert cli_main(argv) == 2
    assert "has another tokenizer: token" in capsys.readouterr().err


def test_bench_guide_writes_a_reward_against_nfe_curve(tmp_path, capsys):
    import json

    from conftest import train_tiny
    from dlm.cli import main as cli_main

    run_dir = train_tiny(
        tmp_path,
        objective="sft",
        data=REPEAT_SFT,
    )
    out, png = tmp_path / "guide.json", tmp_path / "guide.png"
    argv = ["bench", "guide", "--checkpoint", run_dir, "--task", "repeat", "--task-args", "period=4,repeats=2"]
    argv += ["--prompts", "3", "--budgets", "1,2", "--seeds", "0,1", "--gen-length", "8", "--methods", "smc,svdd,dts"]
    argv += ["--reference", run_dir, "--json", str(out), "--plot", str(png)]
    assert cli_main(argv) == 0
    record = json.loads(out.read_text())
    methods = {(a["method"], a["budget"]) for a in record["summary"]}
    assert methods == {(m, b) for m in ("best_of_n", "smc", "svdd", "dts") for b in (1, 2)}
    assert len(record["rows"]) == 4 * 2 * 2 and all(0 <= r["reward"] <= 1 for r in record["rows"])
    bon = {a["budget"]: a for a in record["summary"] if a["method"] == "best_of_n"}
    assert bon[2]["nfe"] == pytest.approx(2 * bon[1]["nfe"])  # N samples cost N decodings
    assert bon[1]["best_of_n_at_equal_nfe"] == pytest.approx(bon[1]["reward"])
    assert record["reference"]["reward"] == pytest.approx(bon[1]["reward"])  # same model, same seeds
    assert png.stat().st_size > 1000 and "best_of_n" in capsys.readouterr().out
