"""RL invariants (docs/rl.md#what-the-tests-check): rows, log-probs, the clipped loss, advantages and rewards."""

import math

import pytest
import torch

from conftest import tiny_model
from dlm.decode import build_decoder
from dlm.train.objectives import subs_log_probs
from dlm.train.rl.estimators import Rollouts, Rows, build_rows, expected_rows, token_logprobs
from dlm.train.rl.loop import evened_logprobs, row_forwards
from dlm.train.rl.loss import group_advantages, loss_count, policy_loss
from dlm.train.rl.rewards import RewardError, combine, score

MASK = 63


def rollouts(name="confidence", batch=2, **kw):
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 63, (batch, 5), generator=torch.Generator().manual_seed(1))
    pad = torch.ones_like(prompt)
    pad[1, :2] = 0  # ragged, left-padded
    dec = build_decoder(name, gen_length=12, block_length=4, eos_token_id=None, temperature=1.0, **kw)
    out = dec(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0))
    full_pad = torch.cat([pad, torch.ones(batch, 12, dtype=torch.long)], dim=1)
    return model, out, Rollouts(out.tokens, out.step_map, out.prompt_length, full_pad)


@pytest.mark.parametrize(
    "name, kw", [("confidence", {"steps": 12}), ("ancestral", {"steps": 6}), ("first_hitting", {})]
)
def test_exact_trajectory_rows_give_the_decode_time_log_probs(name, kw):
    model, out, r = rollouts(name, **kw)
    rows = build_rows("trajectory", r, MASK, shrink=1)
    with torch.no_grad():
        logp = token_logprobs(model, r, rows, MASK)
    trainable = r.trainable
    torch.testing.assert_close(logp[trainable].double(), out.logprobs[trainable], atol=1e-4, rtol=1e-4)
    assert logp[trainable].sum().item() == pytest.approx(out.logprobs[trainable].sum().item(), abs=1e-3)


@pytest.mark.parametrize("shrink", [1, 2, 3, 5])
def test_trajectory_rows_are_disjoint_cover_every_token_and_number_ceil_steps_over_s(shrink):
    _, out, r = rollouts("confidence", steps=12)
    rows = build_rows("trajectory", r, MASK, shrink=shrink)
    for b in range(2):
        mine = rows.targets[rows.owner == b]
        assert torch.equal(mine.sum(0), r.trainable[b].long())  # every trainable token exactly once
        steps = len(torch.unique(r.step_map[b][r.trainable[b]]))
        assert mine.shape[0] == expected_rows(steps, shrink)
        # each row's state masks exactly its targets and everything decoded later
        for x, t in zip(rows.inputs[rows.owner == b], mine):
            first = r.step_map[b][t].min()
            assert torch.equal(x == MASK, (r.step_map[b] >= first) & (r.step_map[b] >= 0) | (r.tokens[b] == MASK))


def test_coupled_rows_are_the_seeded_mask_and_its_complement_with_weights_one_over_t_and_one_minus_t():
    """Recompute the rows from the generator's draws, in the code's order: t ~ U(0.2, 0.8) per
    rollout (float64), then one float64 uniform per completion position; m = u < t."""
    _, _, r = rollouts("confidence", steps=12)
    rows = build_rows("coupled", r, MASK, generator=torch.Generator().manual_seed(3))
    B, T = r.tokens.shape
    P = r.prompt_length
    g = torch.Generator().manual_seed(3)
    t = 0.2 + 0.6 * torch.rand(B, generator=g, dtype=torch.float64)
    u = torch.rand(B, T - P, generator=g, dtype=torch.float64)
    m = torch.zeros(B, T, dtype=torch.bool)
    m[:, P:] = u < t[:, None]
    m &= r.trainable
    assert torch.equal(rows.owner, torch.tensor([0, 0, 1, 1]))
    for b in range(B):
        a, c = rows.targets[2 * b], rows.targets[2 * b + 1]
        assert torch.equal(a, m[b]) and torch.equal(c, r.trainable[b] & ~m[b])
        assert a.any() and c.any()  # both halves are exercised
        torch.testing.assert_close(rows.weights[2 * b], torch.where(a, 1 / t[b], 0.0).float(), rtol=1e-7, atol=0)
        torch.testing.assert_close(
            rows.weights[2 * b + 1], torch.where(c, 1 / (1 - t[b]), 0.0).float(), rtol=1e-7, atol=0
        )
        for x, part in ((rows.inputs[2 * b], a), (rows.inputs[2 * b + 1], c)):
            assert torch.equal(x, r.tokens[b].masked_fill(part, MASK))  # only its own half is masked


class ContextFree(torch.nn.Module):
    """The same logits at every position whatever the input (no output_mask support)."""

    def __init__(self, logits_V):
        super().__init__()
        self.logits_V = logits_V

    def forward(self, input_ids, attention_mask=None):
        return self.logits_V.expand(*input_ids.shape, -1)


@torch.no_grad()
def test_each_coupled_row_is_unbiased_for_the_log_prob_of_a_context_free_model():
    """For a context-free model log p(token) does not depend on the mask, so E[Σ weight·log p]
    = Σ E[weight]·log p. The mask row scores a token with probability t at weight 1/t, the
    complement with probability 1 − t at weight 1/(1 − t): each row alone has expected weight 1
    per token and estimates Σ log p without bias, and the coupled sum of the two (what
    token_logprobs returns for a rollout) estimates 2·Σ log p (weights 1/t and 1/(1 − t) as
    docs/rl.md#coupled-grpo states; an estimate of Σ log p itself would need half those weights)."""
    V, mask = 6, 5
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    model = ContextFree(logits)
    n, P = 1500, 3
    tokens = torch.tensor([[1, 2, 3, 0, 4, 2, 1, 3, 0]]).expand(n, -1).clone()
    step_map = torch.tensor([[-1] * P + list(range(6))]).expand(n, -1).clone()
    r = Rollouts(tokens, step_map, P)
    full = subs_log_probs(logits, mask)[tokens[0, P:]].double().sum().item()
    rows = build_rows("coupled", r, mask, generator=torch.Generator().manual_seed(0))
    coupled = token_logprobs(model, r, rows, mask, batch_size=2 * n).sum(1).double()
    halves = []
    for k in (0, 1):  # the mask rows alone, then the complement rows alone
        half = Rows(rows.inputs[k::2], rows.targets[k::2], rows.weights[k::2], rows.owner[k::2])
        halves.append(token_logprobs(model, r, half, mask, batch_size=n).sum(1).double())
        mean, se = halves[-1].mean().item(), halves[-1].std().item() / math.sqrt(n)
        assert abs(mean - full) < 4 * se, (k, mean, full, se)
    torch.testing.assert_close(coupled, halves[0] + halves[1], rtol=1e-5, atol=1e-5)
    mean, se = coupled.mean().item(), coupled.std().item() / math.sqrt(n)
    assert abs(mean - 2 * full) < 4 * se, (mean, full, se)


def test_one_step_rows_mask_the_completion_and_some_prompt():
    _, _, r = rollouts("confidence", batch=2, steps=12)
    rows = build_rows("one_step", r, MASK, p_mask=0.5, generator=torch.Generator().manual_seed(0))
    assert rows.inputs.shape[0] == 2
    assert (rows.inputs[:, r.prompt_length :] == MASK).all()
    assert torch.equal(rows.targets, r.trainable)
    prompt_masked = (rows.inputs[:, : r.prompt_length] == MASK) & r.pad[:, : r.prompt_length].bool()
    assert 0 < prompt_masked.sum() < r.pad[:, : r.prompt_length].sum()


def test_ratio_is_exactly_one_without_an_update_and_the_gradient_is_minus_advantage():
    model, _, r = rollouts("confidence", steps=12)
    rows = build_rows("trajectory", r, MASK, shrink=2)
    with torch.no_grad():
        old = token_logprobs(model, r, rows, MASK)
    new = token_logprobs(model, r, rows, MASK)
    adv = torch.tensor([1.5, -0.5])
    out = policy_loss(new, old, adv, r.trainable)
    assert out.ratio_mean == 1.0 and out.clip_fraction == 0.0
    leaf = new.detach().requires_grad_()
    policy_loss(leaf, old, adv, r.trainable).loss.backward()
    n = r.trainable.sum()
    want = torch.where(r.trainable, -adv[:, None] / n, torch.zeros_like(leaf))
    torch.testing.assert_close(leaf.grad, want)


def test_clipped_tokens_get_no_gradient():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.5, -0.5, 0.0], [0.5, -0.5, 0.0]], requires_grad=True)  # ratios e^.5, e^-.5, 1
    adv = torch.tensor([1.0, -1.0])
    out = policy_loss(new, old, adv, torch.ones(2, 3, dtype=torch.bool), eps_low=0.2, eps_high=0.2)
    out.loss.backward()
    # A > 0: ratio above 1 + eps is clipped (no gradient); below 1 - eps it still pushes up
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0 and new.grad[0, 2] != 0
    # A < 0: ratio below 1 - eps is clipped; above 1 + eps it still pushes down
    assert new.grad[1, 1] == 0 and new.grad[1, 0] != 0 and new.grad[1, 2] != 0
    assert out.clip_fraction == pytest.approx(2 / 6)


def test_equal_rewards_in_a_group_give_zero_gradient():
    model, _, r = rollouts("confidence", steps=12)
    rows = build_rows("trajectory", r, MASK)
    with torch.no_grad():
        old = token_logprobs(model, r, rows, MASK)
    adv, zero = group_advantages(torch.tensor([0.7, 0.7]), torch.tensor([0, 0]))
    assert zero.all() and torch.equal(adv, torch.zeros(2))
    model.zero_grad()
    policy_loss(token_logprobs(model, r, rows, MASK), old, adv, r.trainable).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_group_advantages_centre_scale_and_refuse_groups_of_one():
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), torch.tensor([0, 0, 1, 1]))
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0] and zero.tolist() == [False, False, True, True]
    scaled, _ = group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), scale_std=True)
    assert scaled[0].item() == pytest.approx(0.5 / math.sqrt(0.5), rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 rollouts per prompt"):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))


def test_group_advantages_use_the_unbiased_std_plus_eps():
    """Group [0, 3, 6]: mean 3, unbiased variance 18 / 2 = 9, so A = (r − 3) / (3 + eps)."""
    rewards, groups = torch.tensor([0.0, 3.0, 6.0, 2.0, 2.0]), torch.tensor([0, 0, 0, 1, 1])
    adv, zero = group_advantages(rewards, groups, scale_std=True, eps=0.5)
    torch.testing.assert_close(adv, torch.tensor([-3 / 3.5, 0.0, 3 / 3.5, 0.0, 0.0]))
    assert zero.tolist() == [False, False, False, True, True]


def _reference_policy_loss(new, old, adv, mask, eps, ref, beta, norm, step_map=None):
    """The PPO-clip loss with a k3 KL term, token by token in plain Python."""
    per, clipped, kls, ratios = {}, 0, [], []
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not mask[b, t]:
                continue
            rho, a = math.exp(new[b, t] - old[b, t]), float(adv[b])
            d = float(ref[b, t] - new[b, t]) if ref is not None else 0.0
            kl = math.exp(d) - d - 1 if ref is not None and beta > 0 else 0.0
            per[b, t] = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) + beta * kl
            clipped += (rho < 1 - eps and a < 0) or (rho > 1 + eps and a > 0)
            kls.append(kl)
            ratios.append(rho)
    n = max(len(per), 1)
    if norm == "token":
        loss = sum(per.values()) / n
    elif norm == "sequence":
        rows = [[v for (b, _), v in per.items() if b == row] for row in range(new.shape[0])]
        loss = sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    elif norm == "step":
        cells = {}
        for (b, t), v in per.items():
            cells.setdefault((b, int(step_map[b, t])), []).append(v)
        loss = sum(sum(c) / len(c) for c in cells.values()) / len(cells) if cells else 0.0
    else:
        loss = sum(per.values())
    return loss, clipped / n, sum(kls) / n, sum(ratios) / n


@pytest.mark.parametrize("norm", ["token", "sequence", "step", "none"])
def test_policy_loss_and_its_statistics_in_closed_form(norm):
    """Ratios on both sides of the clip range with positive, negative and zero advantages, a KL
    reference, one token left out of the mask and a rollout with no tokens at all."""
    norm = "".join(list(norm))  # a new string object, as a parsed recipe gives: compared by value
    old = torch.zeros(4, 3)
    new = torch.tensor([[0.5, -0.5, 0.0], [math.log(0.5), 0.0, 0.3], [0.5, -0.5, 0.1], [0.2, 0.2, 0.2]])
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True], [False, False, False]])
    ref = torch.tensor([[0.2, -0.1, 0.0], [0.1, 0.4, 0.0], [-0.3, 0.0, 0.5], [0.0, 0.0, 0.0]])
    steps = torch.tensor([[0, -1, 1], [0, 1, -1], [2, 0, 0], [-1, -1, -1]])  # a masked step −1: its own cell
    for beta, logp_ref in ((0.5, ref), (0.0, ref), (0.5, None)):
        out = policy_loss(new, old, adv, mask, 0.2, 0.2, logp_ref=logp_ref, beta=beta, norm=norm, step_map=steps)
        want = _reference_policy_loss(new, old, adv, mask, 0.2, logp_ref, beta, norm, steps)
        assert out.loss.item() == pytest.approx(want[0], rel=1e-5), (beta, logp_ref is None)
        assert (out.clip_fraction, out.kl, out.ratio_mean) == pytest.approx(want[1:], rel=1e-5)
    one = torch.zeros(4, 3, dtype=torch.bool)
    one[1, 0] = True  # a single token: nothing is halved by a clamp on the count
    out = policy_loss(new, old, adv, one, 0.2, 0.2, logp_ref=ref, beta=0.5, norm=norm, step_map=steps)
    want = _reference_policy_loss(new, old, adv, one, 0.2, ref, 0.5, norm, steps)
    assert out.loss.item() == pytest.approx(want[0], rel=1e-5)
    assert (out.clip_fraction, out.kl, out.ratio_mean) == pytest.approx(want[1:], rel=1e-5)
    leaf = new.clone().requires_grad_()
    empty = policy_loss(leaf, old, adv, torch.zeros(4, 3, dtype=torch.bool), norm=norm, step_map=steps)
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad  # nothing to learn from, still a graph


def test_clip_statistics_defaults_and_one_step_rollouts():
    """Clipping is counted only where the clip binds (the advantage's side of the range); the
    defaults are ε = 0.2 both sides, no KL, token norm; an empty batch has zero statistics; rollouts
    that all decoded in one step are one (rollout, step) pair each."""
    ratio = torch.tensor([[1.1, 1.3, 0.9, 0.7, 1.3, 0.7, 1.3, 0.7]])
    signs = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0, 0.0, -1.0, 1.0]])  # per-token advantage via one row each
    new, old = ratio.log().T, torch.zeros(8, 1)  # eight rollouts of one token
    out = policy_loss(new, old, signs[0], torch.ones(8, 1, dtype=torch.bool), 0.2, 0.2)
    assert out.clip_fraction == pytest.approx(2 / 8)  # 1.3 with A > 0 and 0.7 with A < 0, nothing else
    default = policy_loss(new, old, signs[0], torch.ones(8, 1, dtype=torch.bool))
    explicit = policy_loss(new, old, signs[0], torch.ones(8, 1, dtype=torch.bool), 0.2, 0.2, None, 0.0, "token")
    assert default.loss.item() == explicit.loss.item() and default.clip_fraction == explicit.clip_fraction
    with_ref = policy_loss(new, old, signs[0], torch.ones(8, 1, dtype=torch.bool), logp_ref=torch.zeros(8, 1))
    assert with_ref.loss.item() == default.loss.item() and with_ref.kl == 0.0  # default β = 0: no KL term
    empty = policy_loss(new, old, signs[0], torch.zeros(8, 1, dtype=torch.bool))
    assert (empty.clip_fraction, empty.kl, empty.ratio_mean) == (0.0, 0.0, 0.0)
    one_step = torch.zeros(3, 4, dtype=torch.long)  # every rollout decoded all its tokens at step 0
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert loss_count(mask, "step", one_step) == 3.0
    x = torch.zeros(3, 4, requires_grad=True)
    policy_loss(x, x.detach(), torch.tensor([1.0, 2.0, 3.0]), mask, norm="step", step_map=one_step).loss.backward()
    torch.testing.assert_close(x.grad, -torch.tensor([1.0, 2.0, 3.0])[:, None].expand(3, 4) / 12)


def test_kl_penalty_is_k3_and_zero_at_the_reference():
    new = torch.zeros(1, 2, requires_grad=True)
    out = policy_loss(
        new, new.detach(), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), logp_ref=new.detach(), beta=0.1
    )
    assert out.kl == 0.0
    ref = torch.tensor([[0.3, -0.3]])
    out = policy_loss(new, new.detach(), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), logp_ref=ref, beta=1.0)
    assert out.kl == pytest.approx(((math.exp(0.3) - 1.3) + (math.exp(-0.3) - 0.7)) / 2, rel=1e-5)


def test_rewards_builtin_user_and_combined():
    assert score("arithmetic", ["1 + 2 ="] * 2, [" 3", " 4 is it"], answer=["3", "3"]) == [1.0, 0.0]
    assert score("answer_tags", ["q"], ["x <answer>4</answer>"]) == [1.0]
    assert score("boxed", ["q", "q"], ["so \\boxed{\\frac{1}{2}}", "none"]) == [1.0, 0.0]
    assert score("repeat", ["a b"], ["a b a c"], response=["a b a b"]) == [0.75]
    assert score("tests_rewards:always_one", ["p"], ["c"]) == [1.0]
    total, parts = combine({"answer_tags": 0.5, "arithmetic": 1.0}, ["q"], ["<answer>3</answer>"], answer=["3"])
    assert total == [1.5] and parts["answer_tags"] == [1.0]


def test_reward_errors_name_the_reward():
    with pytest.raises(RewardError, match="unknown reward 'arithmetik'; known rewards: .*arithmetic.*Did you mean"):
        score("arithmetik", ["p"], ["c"])
    with pytest.raises(RewardError, match="reward 'tests_rewards:broken' raised ZeroDivisionError"):
        score("tests_rewards:broken", ["p"], ["c"])
    with pytest.raises(RewardError, match="reward 'tests_rewards:short' returned 1 values for 2 completions"):
        score("tests_rewards:short", ["p", "q"], ["c", "d"])
    with pytest.raises(RewardError, match="cannot import 'nope' from 'tests_rewards'"):
        score("tests_rewards:nope", ["p"], ["c"])


def block_causal_rollouts(name="confidence", block_length=4, batch=3, gen=16, **kw):
    """A block-causal model (blocks of 4), prompts of 5 columns (so the decoder aligns by 3), ragged."""
    model = tiny_model(seed=4, attention_mode="block_causal", block_size=4)
    prompt = torch.randint(0, 63, (batch, 5), generator=torch.Generator().manual_seed(2))
    pad = torch.ones_like(prompt)
    pad[1, :2] = 0
    pad[2, :4] = 0
    dec = build_decoder(name, gen_length=gen, block_length=block_length, eos_token_id=None, temperature=1.0, **kw)
    out = dec(model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(5))
    full_pad = torch.cat([pad, torch.ones(batch, gen, dtype=torch.long)], dim=1)
    return model, out, Rollouts(out.tokens, out.step_map, out.prompt_length, full_pad)


@pytest.mark.parametrize(
    "name, kw", [("confidence", {"steps": 16}), ("ancestral", {"steps": 8}), ("first_hitting", {})]
)
@pytest.mark.parametrize("block_length, paired", [(4, True), (8, False)])
def test_block_causal_trajectory_rows_give_the_decode_time_log_probs(name, kw, block_length, paired):
    model, out, r = block_causal_rollouts(name, block_length, **kw)
    rows = build_rows("trajectory", r, MASK, shrink=1, block_size=4)
    # decoder blocks = model blocks: vectorised over blocks; a decoder block spanning two model blocks
    # (earlier model block still partly masked) falls back to the per-step canvases
    assert rows.paired is paired and rows.offset == 3
    with torch.no_grad():
        logp = token_logprobs(model, r, rows, MASK, batch_size=5)
    torch.testing.assert_close(logp[r.trainable].double(), out.logprobs[r.trainable], atol=1e-4, rtol=1e-4)
    if paired:  # and it equals the per-step rows, with fewer (longer) rows
        per_step = build_rows("trajectory", r, MASK, shrink=1, block_size=4, vectorise=False)
        with torch.no_grad():
            torch.testing.assert_close(logp, token_logprobs(model, r, per_step, MASK))
        assert rows.inputs.shape[0] < per_step.inputs.shape[0]


PIPELINED = {"steps": 16, "rule": "threshold", "threshold": 0.9, "open_next_at": 0.5, "max_open_blocks": 3}


@pytest.mark.parametrize("cache", ["none", "exact"])
def test_pipelined_block_causal_trajectories_give_the_decode_time_log_probs(cache):
    """With blocks pipelined a step decodes in several open blocks, each attending to its
    predecessors' partial state: the per-step rows rebuild exactly those states."""
    model, out, r = block_causal_rollouts("confidence", 4, cache=cache, **PIPELINED)
    P = out.prompt_length
    blocks_per_step = [len({int(c) // 4 for c in (out.step_map[:, P:] == s).nonzero()[:, 1]}) for s in range(16)]
    assert max(blocks_per_step) > 1  # some step decoded in two blocks: pipelined
    rows = build_rows("trajectory", r, MASK, shrink=1, block_size=4)
    with torch.no_grad():
        logp = token_logprobs(model, r, rows, MASK, batch_size=5)
    torch.testing.assert_close(logp[r.trainable].double(), out.logprobs[r.trainable], atol=1e-4, rtol=1e-4)


def test_pipelined_bidirectional_trajectories_give_the_decode_time_log_probs():
    model, out, r = rollouts("confidence", **{**PIPELINED, "steps": 12})
    rows = build_rows("trajectory", r, MASK, shrink=1)
    with torch.no_grad():
        logp = token_logprobs(model, r, rows, MASK)
    torch.testing.assert_close(logp[r.trainable].double(), out.logprobs[r.trainable], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shrink", [1, 2, 3])
def test_vectorised_block_rows_are_disjoint_cover_every_token_and_number_the_longest_block(shrink):
    _, _, r = block_causal_rollouts("confidence", 4, steps=16)
    rows = build_rows("trajectory", r, MASK, shrink=shrink, block_size=4)
    L = rows.inputs.shape[1] // 2
    noisy_targets = rows.targets[:, :L]
    assert not rows.targets[:, L:].any()
    for b in range(3):
        mine = noisy_targets[rows.owner == b][:, rows.offset :]
        assert torch.equal(mine.sum(0), r.trainable[b].long())  # every trainable token exactly once
        steps_per_block = [
            len(torch.unique(r.step_map[b, c : c + 4][r.trainable[b, c : c + 4]])) for c in range(5, 21, 4)
        ]
        assert mine.shape[0] == max(expected_rows(n, shrink) for n in steps_per_block)
        # the clean half is the finished canvas; the noisy half masks each target and what its block decoded later
        for x, t in zip(rows.inputs[rows.owner == b], mine):
            assert torch.equal(x[L + rows.offset :], r.tokens[b])
            noisy = x[rows.offset : L]
            for c in range(5, 21, 4):
                cols = slice(c, c + 4)
                if t[cols].any():
                    first = r.step_map[b, cols][t[cols]].min()
                    assert torch.equal(noisy[cols] == MASK, r.step_map[b, cols] >= first)


def test_coupled_and_one_step_rows_on_a_block_causal_model_read_clean_earlier_blocks():
    model, _, r = block_causal_rollouts("confidence", 4, steps=16)
    coupled = build_rows("coupled", r, MASK, generator=torch.Generator().manual_seed(3), block_size=4)
    L = coupled.inputs.shape[1] // 2
    assert coupled.paired and coupled.offset == 3
    for b in range(3):
        a, c = coupled.targets[coupled.owner == b][:, 3:L]
        assert not (a & c).any() and torch.equal(a | c, r.trainable[b])
        assert all(torch.equal(x[L + 3 :], r.tokens[b]) for x in coupled.inputs[coupled.owner == b])
    one = build_rows("one_step", r, MASK, p_mask=0.0, generator=torch.Generator().manual_seed(0), block_size=4)
    assert torch.equal(one.targets[:, 3:L], r.trainable) and (one.inputs[:, 3 + r.prompt_length : L] == MASK).all()
    with torch.no_grad():  # a block-causal forward over [z ⊕ x] gives finite log-probs at every target
        lp = token_logprobs(model, r, coupled, MASK)
    assert torch.isfinite(lp).all() and (lp[r.trainable] < 0).all()


@pytest.mark.parametrize("name, kw", [("trajectory", {"shrink": 1}), ("coupled", {}), ("one_step", {})])
def test_rows_of_rollout_slices_concatenate_to_the_rows_of_the_batch(name, kw):
    """dlm rl builds rows per prompt group and concatenates them; a slice where nothing was decoded
    gives rows of the same width (alignment offset, paired halves) with no targets (trajectory: no
    rows at all), and scores nothing."""
    from dlm.train.rl.estimators import concat_rows

    model, _, r = block_causal_rollouts("confidence", 4, steps=16)
    idle = Rollouts(r.tokens[:1], torch.full_like(r.step_map[:1], -1), r.prompt_length, r.pad[:1])
    sliced = [idle, r.select(slice(0, 2)), r.select(slice(2, 3))]  # sizes 1, 2, 1: owners shift by odd starts
    whole = Rollouts(
        *(torch.cat([s.tokens, r.tokens]) for s in (idle,)),
        prompt_length=r.prompt_length,
        step_map=torch.cat([idle.step_map, r.step_map]),
        pad=torch.cat([idle.pad, r.pad]),
    )
    parts = [
        build_rows(name, s, MASK, generator=torch.Generator().manual_seed(i), block_size=4, **kw)
        for i, s in enumerate(sliced)
    ]
    assert parts[0].inputs.shape[1] == parts[1].inputs.shape[1] and not parts[0].targets.any()
    assert (parts[0].inputs.shape[0] == 0) == (name == "trajectory")
    plain = build_rows(name, idle, MASK, generator=torch.Generator().manual_seed(0), **kw)  # no blocks: unpaired
    assert plain.inputs.shape[1] == r.tokens.shape[1] and not plain.targets.any()
    sizes = [1, 2, 1]
    starts = [0, 1, 3]
    rows = concat_rows(parts, sizes)
    assert rows.owner.tolist() == sum((list(p.owner + s) for p, s in zip(parts, starts)), [])
    assert set(rows.owner.tolist()) == ({1, 2, 3} if name == "trajectory" else {0, 1, 2, 3})
    with torch.no_grad():
        logp = token_logprobs(model, whole, rows, MASK)
        for first, n, s, p in zip(starts, sizes, sliced, parts):
            torch.testing.assert_close(logp[first : first + n], token_logprobs(model, s, p, MASK))
    assert (logp[0] == 0).all() and (logp[1:][r.trainable] < 0).all()


def test_block_rows_check_the_decoding_order_and_cover_every_token_of_crafted_step_maps():
    """Model blocks of 2, no prompt. Rows are paired (one forward per group of steps over all
    blocks) only when every step stays in one block and blocks are decoded in order; either way
    every decoded token is scored once, whatever the shrink."""
    tokens = torch.randint(0, 63, (1, 8), generator=torch.Generator().manual_seed(0))

    def rows_for(steps, **kw):
        return build_rows("trajectory", Rollouts(tokens, torch.tensor([steps]), 0, None), MASK, block_size=2, **kw)

    blockwise = [0, 0, 1, 2, 3, 3, 4, 5]  # block 0 in one step (step 0), then one block after another
    for shrink in (1, 100):
        rows = rows_for(blockwise, shrink=shrink)
        assert rows.paired and rows.offset == 0
        assert torch.equal(rows.targets[:, :8].sum(0), torch.ones(8, dtype=torch.long)), shrink
    default = rows_for(blockwise)
    assert torch.equal(default.inputs, rows_for(blockwise, shrink=1).inputs)  # shrink defaults to 1: exact
    for steps in (
        [0, 1, 1, 2, 3, 4, 5, 6],  # step 1 decodes a token in block 0 and one in block 1
        [0, 1, 4, 5, 2, 3, 6, 7],  # block 2 before block 1
        [1, 2, 0, 3, 4, 5, 6, 7],  # block 1's step-0 token before block 0
    ):
        rows = rows_for(steps)
        assert not rows.paired, steps
        assert torch.equal(rows.targets.sum(0), torch.ones(8, dtype=torch.long)), steps


def test_blockwise_check_reads_every_rollout_past_one_with_nothing_decoded():
    """Rollout 0 decoded nothing (a finished row), rollout 1 decodes out of block order: the check
    must go on past rollout 0 and refuse the paired layout."""
    from dlm.train.rl.estimators import _blockwise

    steps = torch.tensor([[-1] * 8, [0, 1, 4, 5, 2, 3, 6, 7]])
    assert not _blockwise(steps, 2)
    assert _blockwise(torch.tensor([[-1] * 8, [0, 0, 1, 2, 3, 3, 4, 5]]), 2)


def test_block_rows_never_score_a_never_decoded_position_inside_a_decoded_block():
    """A crafted step map with a hole (-1) inside decoded blocks: the hole is masked in every state
    and is no row's target, whatever the shrink."""
    tokens = torch.randint(0, 63, (1, 8), generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([[0, -1, 1, 2, 3, -1, 4, 5]])
    for shrink in (1, 2):
        rows = build_rows("trajectory", Rollouts(tokens, steps, 0, None), MASK, block_size=2, shrink=shrink)
        assert rows.paired
        hit = rows.targets[:, :8].sum(0)
        assert hit.tolist() == [1, 0, 1, 1, 1, 0, 1, 1], shrink
        assert (rows.inputs[:, [1, 5]] == MASK).all()  # noisy halves
        assert (rows.inputs[:, [9, 13]] == MASK).all()  # clean halves: never decoded, never clean


def test_shrink_below_one_is_refused():
    _, _, r = rollouts("confidence", steps=12)
    for shrink in (0, -1):
        with pytest.raises(ValueError, match=f"shrink={shrink} must be >= 1"):
            build_rows("trajectory", r, MASK, shrink=shrink)


def test_one_step_rows_hide_each_prompt_token_with_probability_p_mask():
    """diffu-GRPO's prompt masking: each real prompt token hidden independently with p = p_mask
    (default 0.15), padding never."""
    batch, P = 64, 50
    tokens = torch.randint(0, 63, (batch, P + 4), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(tokens)
    pad[::2, :10] = 0
    step_map = torch.full_like(tokens, -1)
    step_map[:, P:] = torch.arange(4)
    r = Rollouts(tokens, step_map, P, pad)
    real = pad[:, :P].bool()
    for p_mask, kw in ((0.15, {}), (0.6, {"p_mask": 0.6})):
        rows = build_rows("one_step", r, MASK, generator=torch.Generator().manual_seed(1), **kw)
        hidden = rows.inputs[:, :P] == MASK
        assert not (hidden & ~real).any() or (tokens[:, :P][hidden & ~real] == MASK).all()
        rate = hidden[real].double().mean().item()
        se = math.sqrt(p_mask * (1 - p_mask) / int(real.sum()))
        assert abs(rate - p_mask) < 4 * se, (p_mask, rate)


def test_token_logprobs_sums_rows_that_score_the_same_token():
    """The contract is a sum over rows: two rows scoring one position add their weighted log-probs."""
    model, _, r = rollouts("confidence", steps=12)
    rows = build_rows("one_step", r, MASK, generator=torch.Generator().manual_seed(0))
    twice = Rows(
        torch.cat([rows.inputs, rows.inputs]),
        torch.cat([rows.targets, rows.targets]),
        torch.cat([rows.weights, 0.5 * rows.weights]),
        torch.cat([rows.owner, rows.owner]),
    )
    with torch.no_grad():
        once = token_logprobs(model, r, rows, MASK)
        both = token_logprobs(model, r, twice, MASK, batch_size=64)  # both copies in one batch
    torch.testing.assert_close(both, 1.5 * once)


def test_trajectory_rows_without_a_padding_mask_hide_the_alignment_columns():
    """Rollouts with no padding mask on a block-causal model whose prompt is off the block grid
    (3 columns, blocks of 4): the rows' alignment column is hidden as the decoder's was, so exact
    rows (per-step canvases and vectorised) give the decode-time log-probs."""
    model = tiny_model(seed=4, attention_mode="block_causal", block_size=4)
    prompt = torch.randint(0, 63, (2, 3), generator=torch.Generator().manual_seed(2))
    dec = build_decoder("confidence", gen_length=8, steps=8, block_length=4, eos_token_id=None, temperature=1.0)
    out = dec(model, prompt, generator=torch.Generator().manual_seed(5))
    r = Rollouts(out.tokens, out.step_map, out.prompt_length, None)
    for vectorise in (True, False):
        from dlm.train.rl.estimators import trajectory_rows

        rows = trajectory_rows(r, MASK, block_size=4, vectorise=vectorise)
        assert rows.offset == 1 and rows.paired == vectorise
        with torch.no_grad():
            logp = token_logprobs(model, r, rows, MASK)
        torch.testing.assert_close(logp[r.trainable].double(), out.logprobs[r.trainable], atol=1e-4, rtol=1e-4)


def test_unknown_estimator_names_the_known_ones():
    _, _, r = rollouts("confidence", steps=12)
    with pytest.raises(ValueError, match="unknown log-prob estimator 'bogus'.*coupled.*one_step.*trajectory"):
        build_rows("bogus", r, MASK)


def test_paired_rows_put_both_halves_at_the_canvas_positions():
    """``[z ⊕ x]`` rows give each half the positions the decoder used: left padding takes none."""
    model, _, r = block_causal_rollouts("confidence", 4, steps=16)
    rows = build_rows("trajectory", r, MASK, shrink=1, block_size=4)
    seen = []
    forward = model.forward
    model.forward = lambda *a, **kw: seen.append(kw["position_ids"]) or forward(*a, **kw)
    with torch.no_grad():
        token_logprobs(model, r, rows, MASK, batch_size=len(rows.owner))
    pad = torch.cat([torch.zeros(3, rows.offset, dtype=torch.long), r.pad], 1)
    canvas = (pad.cumsum(-1) - 1).clamp(min=0)[rows.owner]
    assert torch.equal(seen[0], torch.cat([canvas, canvas], 1))
    assert seen[0][rows.owner == 1, rows.offset + 2].eq(0).all()  # row 1's first real token is position 0


def test_random_rows_are_new_per_inner_update_and_do_not_depend_on_left_padding():
    from dlm.config import from_dict
    from dlm.train.rl.loop import RLRecipe, make_rows

    _, _, r = rollouts("confidence", batch=2, steps=12)
    cfg = from_dict(RLRecipe, {"rl": {"init": "x", "estimator": "coupled", "group_size": 2, "p_mask": 0.5}})
    a, again, b = (make_rows(cfg, r, MASK, None, 3, 0, 1, inner) for inner in (0, 0, 1))
    assert torch.equal(a.inputs, again.inputs) and not torch.equal(a.inputs, b.inputs)
    # the same rollouts with two more padding columns on the left: the same masks on real tokens
    pad2 = lambda t, v: torch.cat([t.new_full((t.shape[0], 2), v), t], 1)  # noqa: E731
    wide = Rollouts(pad2(r.tokens, 0), pad2(r.step_map, -1), r.prompt_length + 2, pad2(r.pad, 0))
    for name in ("coupled", "one_step"):
        cfg = from_dict(RLRecipe, {"rl": {"init": "x", "estimator": name, "group_size": 2, "p_mask": 0.5}})
        narrow_rows, wide_rows = make_rows(cfg, r, MASK, None, 3, 0, 1, 0), make_rows(cfg, wide, MASK, None, 3, 0, 1, 0)
        assert torch.equal(narrow_rows.inputs, wide_rows.inputs[:, 2:]) and torch.equal(
            narrow_rows.weights, wide_rows.weights[:, 2:]
        )


def test_step_normalisation_counts_each_decoding_step_once():
    # rollout 0 decoded two tokens at step 0 and one at step 1; rollout 1 one token per step
    step_map = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, -1]])
    mask = step_map >= 0
    new = torch.zeros(2, 4, requires_grad=True)
    res = policy_loss(new, new.detach(), torch.tensor([1.0, -1.0]), mask, norm="step", step_map=step_map)
    res.loss.backward()
    # four (rollout, step) pairs weigh 1/4 each; the two tokens of one step share their pair's weight
    expected = torch.tensor([[0.0, -0.125, -0.125, -0.25], [0.0, 0.25, 0.25, 0.0]])
    torch.testing.assert_close(new.grad, expected)
    token = policy_loss(new, new.detach(), torch.tensor([1.0, -1.0]), mask, norm="token")
    assert token.loss.item() == pytest.approx(-1 / 5)  # (-3 + 2) / 5 tokens
    with pytest.raises(ValueError, match="norm='step' needs the rollouts' step_map"):
        policy_loss(new, new.detach(), torch.tensor([1.0, -1.0]), mask, norm="".join(["st", "ep"]))


@pytest.mark.parametrize("norm", ["token", "sequence", "step", "none"])
def test_processes_holding_uneven_parts_of_a_batch_train_as_one_process(norm):
    """Two halves of a batch with different numbers of tokens and steps: each divided by half the
    global count, their mean gradient is the whole batch's (what N averaged processes compute)."""
    norm = "".join(list(norm))  # a new string object, as a parsed recipe gives: compared by value
    g = torch.Generator().manual_seed(3)
    step_map = torch.tensor([[0, 0, 1, 2], [0, 1, -1, -1], [0, 0, 0, 1], [1, 0, 2, 3]])
    mask = step_map >= 0
    new = torch.randn(4, 4, generator=g).requires_grad_()
    old, adv = new.detach() + 0.1 * torch.randn(4, 4, generator=g), torch.tensor([1.0, -0.5, 0.25, 2.0])
    whole = policy_loss(new, old, adv, mask, norm=norm, step_map=step_map)
    (expected,) = torch.autograd.grad(whole.loss, new)
    halves = [slice(0, 1), slice(1, 4)]  # one rollout against three: counts differ
    total = sum(loss_count(mask[h], norm, step_map[h]) for h in halves) if norm != "none" else 1.0
    grads = []
    for h in halves:
        part = policy_loss(new[h], old[h], adv[h], mask[h], norm=norm, step_map=step_map[h], count=total / 2)
        grads.append(torch.autograd.grad(part.loss, new)[0])
    torch.testing.assert_close((grads[0] + grads[1]) / 2, expected)
    assert loss_count(mask, norm, step_map) == {"token": 14.0, "sequence": 4.0, "step": 11.0, "none": 1.0}[norm]


def test_extra_row_forwards_change_neither_the_log_probs_nor_their_gradients():
    """Under a sharded engine every process makes as many row forwards as the busiest: the extra
    calls repeat a batch with weight zero."""
    model, _, r = rollouts("confidence", steps=12)
    rows = build_rows("trajectory", r, MASK, shrink=1)
    needed = row_forwards(rows, 5)
    assert needed == -(-rows.inputs.shape[0] // 5) and needed >= 2
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    outs, grads = [], []
    for forwards in (0, needed - 1, needed + 3):
        calls.clear()
        model.zero_grad()
        out = evened_logprobs(model, r, rows, MASK, 5, forwards)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        assert len(calls) == max(needed, forwards)
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    hook.remove()
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
        for a, b in zip(grad, grads[0]):
            torch.testing.assert_close(a, b)
    empty = Rows(rows.inputs[:0], rows.targets[:0], rows.weights[:0], rows.owner[:0])
    with pytest.raises(ValueError, match="extra forwards need at least one row"):
        evened_logprobs(model, r, empty, MASK, 5, 1)


def test_tokens_after_the_first_eos_can_be_left_out_of_the_loss():
    from dlm.train.rl.loop import after_first_eos

    tokens = torch.tensor([[5, 5, 7, 2, 9, 2, 2], [5, 5, 7, 8, 9, 6, 4], [5, 2, 2, 3, 4, 5, 6]])
    # prompt of 2 columns; EOS = 2: row 0 keeps up to its EOS at column 3; row 1 has none; the
    # prompt's own 2 in row 2 does not count
    expected = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(after_first_eos(tokens, 2, 2), expected)
    assert not after_first_eos(tokens, 2, None).any()


def eos_rollouts(name, cache, block_causal, **kw):
    """Rollouts in which most completions contain EOS: a sharpened tiny model (final norm × 16)
    whose most frequently sampled token is made the EOS token."""
    blocks = dict(attention_mode="block_causal", block_size=4) if block_causal else {}
    model = tiny_model(seed=4 if block_causal else 2, **blocks)
    with torch.no_grad():
        model.norm.weight.mul_(16.0)
    prompt = torch.randint(0, 63, (8, 5), generator=torch.Generator().manual_seed(1))
    pad = torch.ones_like(prompt)
    pad[1, :2] = 0  # ragged, left-padded
    settings = dict(gen_length=16, block_length=4, temperature=1.0, cache=cache, **kw)
    plain = build_decoder(name, eos_token_id=None, **settings)(model, prompt, attention_mask=pad)
    eos = int(torch.bincount(plain.generated.flatten(), minlength=64).argmax())
    out = build_decoder(name, eos_token_id=eos, **settings)(
        model, prompt, attention_mask=pad, generator=torch.Generator().manual_seed(0)
    )
    full_pad = torch.cat([pad, torch.ones(8, 16, dtype=torch.long)], dim=1)
    return model, out, eos, Rollouts(out.canvas, out.step_map, out.prompt_length, full_pad)


@pytest.mark.parametrize(
    "name, kw", [("confidence", {"steps": 16}), ("ancestral", {"steps": 8}), ("first_hitting", {})]
)
@pytest.mark.parametrize(
    "cache, block_causal", [("none", False), ("none", True), ("dual", True), ("exact", True), ("prefix", True)]
)
def test_rows_reproduce_the_decoding_of_completions_with_eos(name, kw, cache, block_causal):
    model, out, eos, r = eos_rollouts(name, cache, block_causal, **kw)
    P, gen = out.prompt_length, out.canvas[:, out.prompt_length :]
    finished = (out.generated == eos).any(1)
    assert finished.sum() >= 5  # EOS in most rollouts
    after = torch.zeros_like(r.trainable)
    after[:, P:] = (gen == eos).long().cumsum(1) - (gen == eos).long() > 0
    assert (r.trainable & after).any()  # tokens were decoded after a first EOS: the case under test
    # text view: EOS after the first EOS of a finished row; elsewhere the decoded canvas
    assert (out.tokens[after & finished[:, None]] == eos).all()
    assert torch.equal(out.tokens[~after], out.canvas[~after])
    never = ~r.trainable
    never[:, :P] = False
    assert (out.canvas[never] == MASK).all() and (out.logprobs[never] == 0).all()
    block = 4 if block_causal else None
    rows = build_rows("trajectory", r, MASK, shrink=1, block_size=block)
    with torch.no_grad():
        logp = token_logprobs(model, r, rows, MASK)
    torch.testing.assert_close(logp[r.trainable].double(), out.logprobs[r.trainable], atol=1e-4, rtol=1e-4)
    # one-step and coupled rows: targets are the decoded tokens, inputs show them as decoded, and
    # positions never decoded stay masked (noisy and clean halves alike)
    for estimator in ("one_step", "coupled"):
        rows = build_rows(estimator, r, MASK, generator=torch.Generator().manual_seed(3), block_size=block)
        T, off = r.tokens.shape[1], rows.offset
        halves = [rows.inputs[:, off : off + T]] + ([rows.inputs[:, 2 * off + T :]] if rows.paired else [])
        owned = r.tokens[rows.owner]
        per_rollout = torch.zeros_like(r.step_map).index_add_(0, rows.owner, rows.targets[:, off : off + T].long())
        assert torch.equal(per_rollout, r.trainable.long())  # every decoded token scored exactly once
        for half in halves:
            shown = half != MASK
            assert torch.equal(half[shown], owned[shown])
            assert (half[never[rows.owner]] == MASK).all()
        with torch.no_grad():
            lp = token_logprobs(model, r, rows, MASK)
        assert torch.isfinite(lp).all() and (lp[r.trainable] < 0).all()
    # never-decoded positions are masked in every row whatever the rollout holds there (EOS, as
    # the text view and saved rollouts of older versions show them)
    shown = Rollouts(out.canvas.masked_fill(never, eos), r.step_map, r.prompt_length, r.pad)
    for estimator, extra in (("trajectory", {"shrink": 1}), ("one_step", {}), ("coupled", {})):
        a, b = (
            build_rows(estimator, x, MASK, generator=torch.Generator().manual_seed(3), block_size=block, **extra)
            for x in (r, shown)
        )
        assert torch.equal(a.inputs, b.inputs), estimator
