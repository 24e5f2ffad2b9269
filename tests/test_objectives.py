"""Objective invariants (docs/objectives.md#invariants-at-a-glance)."""

import itertools
import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dlm.schedules import build_schedule
from dlm.train.objectives import build_objective, subs_log_probs
from dlm.train.objectives.ar import next_token_nll
from dlm.train.objectives.exact_count import mask_exactly, stratified_counts
from dlm.train.objectives.mdlm import mask_tokens, mdlm_token_losses

V, MASK = 6, 5  # tiny vocabulary; the last id is the mask token


class UnigramModel(nn.Module):
    """Context-free: the same logits at every position, whatever the input."""

    def __init__(self, logits_V: torch.Tensor):
        super().__init__()
        self.logits_V = logits_V

    def forward(self, input_ids, attention_mask=None, attn_mode=None, output_mask=None, **_):
        out = self.logits_V.expand(*input_ids.shape, -1)
        return out[output_mask] if output_mask is not None else out


def test_subs_gives_the_mask_token_zero_probability():
    logp = subs_log_probs(torch.randn(3, 4, V) * 5, MASK)
    assert torch.isneginf(logp[..., MASK]).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 4))


def test_unmasked_positions_contribute_exactly_zero():
    x0 = torch.randint(0, MASK, (4, 8))
    zt, masked = mask_tokens(x0, torch.full((4, 1), 0.5), torch.rand(4, 8), MASK)
    terms = mdlm_token_losses(torch.randn(4, 8, V), x0, zt, torch.full((4,), 0.5), build_schedule("loglinear"), MASK)
    assert torch.equal(terms[~masked], torch.zeros_like(terms[~masked]))
    assert (terms[masked] > 0).all()


@pytest.mark.parametrize("name", ["mdlm", "exact_count"])
def test_fast_path_equals_full_reference(name):
    """The objective scores only masked rows through the LM head; it must equal the full-logits reference."""
    model = tiny_model()
    obj = build_objective(name, mask_token_id=63)
    x0 = torch.randint(0, 63, (4, 16))
    noise = obj.sample_noise((4, 16), torch.Generator().manual_seed(0))
    fast = obj.loss(model, {"input_ids": x0}, noise)
    if name == "mdlm":
        zt, _ = mask_tokens(x0, (1 - obj.schedule.alpha(noise["t"]))[:, None], noise["u"], 63)
        ref = mdlm_token_losses(model(zt).logits, x0, zt, noise["t"], obj.schedule, 63).sum()
    else:
        masked = mask_exactly(noise["scores"], noise["k"])
        zt = torch.where(masked, torch.full_like(x0, 63), x0)
        nll = -subs_log_probs(model(zt).logits, 63).gather(-1, x0[..., None]).squeeze(-1)
        ref = ((16 / noise["k"].float())[:, None] * nll * masked).sum()
    torch.testing.assert_close(fast.total, ref, rtol=1e-5, atol=1e-5)
    assert fast.count.item() == x0.numel()


def _mc_nelbo(name: str, model, x0: torch.Tensor, n: int, seed: int, **kw) -> tuple[float, float]:
    """Mean and standard error of the per-sequence NELBO estimate over n independent draws."""
    obj = build_objective(name, mask_token_id=MASK, **kw)
    L = x0.shape[-1]
    x = x0.expand(n, -1)
    noise = obj.sample_noise((n, L), torch.Generator().manual_seed(seed))
    # per-row estimates (to measure the spread) from the reference computation
    if name == "exact_count":
        masked = mask_exactly(noise["scores"], noise["k"])
        weight = L / noise["k"].double()
    else:
        masked = noise["u"] < (1 - obj.schedule.alpha(noise["t"]))[:, None]
        weight = obj.schedule.weight(noise["t"]).double()
    zt = torch.where(masked, torch.full_like(x, MASK), x)
    out = model(zt)
    logits = out.logits if hasattr(out, "logits") else out
    nll = -subs_log_probs(logits, MASK).gather(-1, x[..., None]).squeeze(-1).double()
    per_row = weight * (nll * masked).sum(-1)
    total = obj.loss(model, {"input_ids": x}, noise).total.item()
    assert total == pytest.approx(per_row.sum().item(), rel=1e-5)  # the objective computes exactly these
    return per_row.mean().item(), per_row.std().item() / math.sqrt(n)


def exact_nelbo(model, x0: torch.Tensor) -> float:
    """Σ_S (|S|−1)!(L−|S|)!/L! · Σ_{l∈S} −log p(x^l | x_{¬S}) over all non-empty mask sets S."""
    L = x0.shape[-1]
    total = 0.0
    for r in range(1, L + 1):
        for subset in itertools.combinations(range(L), r):
            zt = x0.clone()
            zt[0, list(subset)] = MASK
            out = model(zt)
            logp = subs_log_probs(out.logits if hasattr(out, "logits") else out, MASK)[0]
            nll = sum(-logp[l, x0[0, l]].item() for l in subset)
            total += math.factorial(r - 1) * math.factorial(L - r) / math.factorial(L) * nll
    return total


T_EPS = 1e-3  # t ~ U(T_EPS, 1): at T_EPS = 0 the 1/t estimator has infinite variance (E[X²] = ∫ dt/t)


def time_truncation(schedule) -> float:
    """E_t[w(t)(1 − α_t)] for t ~ U(T_EPS, 1) = (α(T_EPS) − α(1)) / (1 − T_EPS); exactly 1 for loglinear."""
    a = schedule.alpha(torch.tensor([T_EPS, 1.0], dtype=torch.float64))
    return ((a[0] - a[1]) / (1 - T_EPS)).item()


def test_mdlm_with_a_mask_id_inside_the_vocabulary_and_its_default_noise():
    """A published checkpoint's mask id is not its last id (LLaDA: 126336 of 126464): tokens above
    it are ordinary tokens, never counted as masked. By default MDLM's times are antithetic (one
    per stratum of [ε, 1]) with ε = 1e-3."""
    model = tiny_model()
    obj = build_objective("mdlm", mask_token_id=40)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 62, (8, 16), generator=g)
    x0 = x0 + (x0 >= 40).long()  # every id but the mask's, some above it
    assert (x0 > 40).any()
    noise = obj.sample_noise((8, 16), torch.Generator().manual_seed(0))
    zt, masked = mask_tokens(x0, (1 - obj.schedule.alpha(noise["t"]))[:, None], noise["u"], 40)
    terms = mdlm_token_losses(model(zt).logits, x0, zt, noise["t"], obj.schedule, 40)
    assert torch.equal(terms != 0, masked)  # x0 holds no 40: every masked position has a term
    torch.testing.assert_close(obj.loss(model, {"input_ids": x0}, noise).total, terms.sum())
    t = noise["t"]
    strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long().sort().values
    assert torch.equal(strata, torch.arange(8)) and float(t.min()) >= 1e-3 and float(t.max()) <= 1.0


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "polynomial"])
def test_single_token_nelbo_is_minus_log_p_given_mask(schedule):
    logits = torch.randn(V)
    model = UnigramModel(logits)
    x0 = torch.tensor([[2]])
    args = {} if schedule == "polynomial" else {"eps": 0.0}
    target = -subs_log_probs(logits, MASK)[2].item()
    assert exact_nelbo(model, x0) == pytest.approx(target)
    mean, se = _mc_nelbo("mdlm", model, x0, 40000, 0, schedule=schedule, schedule_args=args, t_eps=T_EPS)
    expected = target * time_truncation(build_schedule(schedule, **args))
    assert abs(mean - expected) < 4 * se, (mean, expected, se)


def test_unigram_model_nelbo_is_sum_of_minus_log_p():
    logits = torch.randn(V)
    model = UnigramModel(logits)
    x0 = torch.tensor([[0, 3, 1, 4, 2, 2, 0]])
    target = -subs_log_probs(logits, MASK)[x0[0]].sum().item()
    assert exact_nelbo(model, x0) == pytest.approx(target)
    mean, se = _mc_nelbo("mdlm", model, x0, 40000, 1, schedule_args={"eps": 0.0}, t_eps=T_EPS)
    assert abs(mean - target) < 4 * se  # loglinear: w(t)(1 − α_t) = 1, unbiased for any T_EPS
    # exact-count: (L/k)·Σ over a uniform k-subset has expectation Σ for every k
    mean_k, se_k = _mc_nelbo("exact_count", model, x0, 20000, 2)
    assert abs(mean_k - target) < 4 * se_k
    assert se_k < se  # and a smaller spread than the 1/t estimator


def test_estimators_agree_with_enumeration_on_a_real_model():
    """1/t, cosine-weighted and exact-count estimators all converge to the enumerated NELBO."""
    torch.manual_seed(0)
    from dlm.model import DLMConfig, DLMModel

    model = DLMModel(
        DLMConfig(
            vocab_size=V,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            mask_token_id=MASK,
            initializer_range=0.5,
        )
    ).eval()
    x0 = torch.tensor([[1, 4, 0]])
    exact = exact_nelbo(model, x0)
    with torch.no_grad():
        est = {
            "1/t": _mc_nelbo("mdlm", model, x0, 30000, 3, schedule_args={"eps": 0.0}, t_eps=T_EPS),
            "cosine": _mc_nelbo(
                "mdlm", model, x0, 30000, 4, schedule="cosine", schedule_args={"eps": 0.0}, t_eps=T_EPS
            ),
            "exact_count": _mc_nelbo("exact_count", model, x0, 30000, 5),
        }
    for name, (mean, se) in est.items():  # 0.2% allows for the truncation of t at T_EPS
        assert abs(mean - exact) < 4 * se + 2e-3 * exact, f"{name}: {mean:.4f} ± {se:.4f} vs exact {exact:.4f}"
    # the exact-count estimator has lower variance than the 1/t estimator
    assert est["exact_count"][1] < est["1/t"][1]


def test_stratified_counts_cover_every_stratum():
    g = torch.Generator().manual_seed(0)
    k = stratified_counts(64, 16, g)
    assert k.min() >= 1 and k.max() <= 16
    assert torch.equal(torch.bincount(k, minlength=17)[1:], torch.full((16,), 4))


def test_the_exact_count_objective_stratifies_its_counts_by_default():
    """Built without options (as the registry builds it from a recipe that names only the
    objective) the counts are antithetic: one per stratum of 1..L across the batch."""
    from dlm.train.objectives.exact_count import ExactCountObjective

    for seed in range(3):
        k = ExactCountObjective(mask_token_id=0).sample_noise((16, 16), torch.Generator().manual_seed(seed))["k"]
        assert sorted(k.tolist()) == list(range(1, 17))


def test_mask_exactly_masks_k_positions():
    scores = torch.rand(5, 12)
    k = torch.tensor([1, 3, 6, 11, 12])
    assert torch.equal(mask_exactly(scores, k).sum(-1), k)


class Spy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, input_ids, **kw):
        self.seen.append(input_ids.clone())
        return self.inner(input_ids, **kw)


def test_sft_never_masks_the_prompt_and_normalises_by_answer_length():
    logits = torch.randn(V)
    spy = Spy(UnigramModel(logits))
    obj = build_objective("sft", mask_token_id=MASK, schedule_args={"eps": 0.0}, t_eps=T_EPS)
    x0 = torch.randint(0, MASK, (256, 10))
    loss_mask = torch.zeros_like(x0)
    loss_mask[:, 4:] = 1  # 4 prompt tokens, 6 answer tokens
    noise = obj.sample_noise((256, 10), torch.Generator().manual_seed(0))
    out = obj.loss(spy, {"input_ids": x0, "loss_mask": loss_mask}, noise)
    zt = spy.seen[0]
    assert torch.equal(zt[:, :4], x0[:, :4])
    assert (zt[:, 4:] == MASK).any()
    assert out.count.item() == 256
    # context-free model: E[per-sequence loss] = Σ_answer −log p / answer_length
    nll = -subs_log_probs(logits, MASK)[x0]
    target = (nll[:, 4:].sum(-1) / 6).mean().item()
    assert out.total.item() / 256 == pytest.approx(target, rel=0.1)


@torch.no_grad()
def test_sft_loss_is_each_rows_answer_normalised_nelbo_averaged_over_rows():
    """With a seeded x0 and noise, on a contextual model: row b's loss is
    Σ_{masked answer l} w(t_b)·(−log p(x0^l | z_t)) / |answer_b|, and the objective's total / count
    is the mean over rows. Answer lengths differ per row (one has one token, one none) so the per-row
    normaliser matters; w(t) = 1/t (loglinear); SUBS gives the mask token no probability."""
    model = tiny_model()
    B, L = 5, 12
    obj = build_objective("sft", mask_token_id=63)
    x0 = torch.randint(0, 63, (B, L), generator=torch.Generator().manual_seed(0))
    prompt_len = torch.tensor([2, 4, 7, 11, 12])  # answers of 10, 8, 5, 1 and 0 tokens
    answer = torch.arange(L)[None] >= prompt_len[:, None]
    noise = obj.sample_noise((B, L), torch.Generator().manual_seed(1))
    noise["u"][3, 11] = 0.0  # the one-token answer is masked: its row divides by exactly 1
    out = obj.loss(model, {"input_ids": x0, "loss_mask": answer.long()}, noise)
    t, u = noise["t"], noise["u"]
    per_row = []
    for b in range(B):
        masked = answer[b] & (u[b] < (1 - 1e-3) * t[b])  # mask rate 1 − α_t = (1 − ε)t, ε = 1e-3
        zt = x0[b].masked_fill(masked, 63)
        logits = model(zt[None]).logits[0].double()
        logits[:, 63] = float("-inf")
        nll = -torch.log_softmax(logits, -1).gather(-1, x0[b][:, None]).squeeze(-1)
        per_row.append((nll[masked] / t[b]).sum() / max(int(answer[b].sum()), 1))
    expected = torch.stack(per_row)
    assert (expected[:4] > 0).all() and expected[4] == 0
    assert out.count.item() == B
    torch.testing.assert_close(out.total.double(), expected.sum(), rtol=1e-5, atol=1e-5)
    lengths = answer.sum(-1).clamp(min=1).double()
    wrong = (expected * lengths / lengths.mean()).sum()  # one batch-mean normaliser instead
    assert (wrong - expected.sum()).abs() > 1e-2 * expected.sum()  # not vacuous


def test_ar_loss_is_next_token_cross_entropy_in_causal_mode():
    model = tiny_model()
    x = torch.randint(0, 63, (3, 12))
    out = build_objective("ar").loss(model, {"input_ids": x}, {})
    logits = model(x, attn_mode="causal").logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.total, ref)
    assert out.count.item() == 3 * 11
    torch.testing.assert_close(next_token_nll(logits, x).sum(), ref)


def test_ar_loss_with_a_loss_mask_scores_only_the_answer_tokens():
    """SFT rows carry a loss_mask over the answer: the AR objective scores the prediction of each
    answer token (target column l+1 where loss_mask[l+1]) and counts exactly those."""
    model = tiny_model()
    x = torch.randint(0, 63, (3, 12))
    loss_mask = torch.zeros(3, 12, dtype=torch.long)
    loss_mask[0, 5:] = 1
    loss_mask[1, 11] = 1  # a one-token answer
    loss_mask[2, 1:4] = 1
    out = build_objective("ar").loss(model, {"input_ids": x, "loss_mask": loss_mask}, {})
    logits = model(x, attn_mode="causal").logits
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    torch.testing.assert_close(out.total, per_token[loss_mask[:, 1:].bool()].sum())
    assert out.count.item() == 7 + 1 + 3


def test_objectives_read_a_shifted_model_through_the_engines_wrapper():
    """The training loop hands objectives the prepared model (DDP, DeepSpeed or compiled wrapper),
    which does not forward ``config``: a shifted model must still be scored as shifted."""
    from dlm.model.modeling import is_shifted, supports_output_mask, unwrapped

    model = tiny_model(logits_shift=True)
    x = torch.randint(0, 63, (3, 12))
    bare = build_objective("ar").loss(model, {"input_ids": x}, {}).total

    class DeepSpeedEngine(nn.Module):  # deepspeed's wrapper, matched by name (deepspeed is optional)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    wrappers = [nn.DataParallel(model), DeepSpeedEngine(model), torch.compile(model), DeepSpeedEngine(torch.compile(model))]
    assert not hasattr(wrappers[0], "config") and not hasattr(wrappers[1], "config")  # what the bug was
    for wrapped in wrappers:
        assert unwrapped(wrapped) is model and is_shifted(wrapped) and supports_output_mask(wrapped)
    torch.testing.assert_close(build_objective("ar").loss(wrappers[0], {"input_ids": x}, {}).total, bare)
    assert unwrapped(model) is model and not is_shifted(tiny_model())


def test_unknown_objective_lists_known():
    from dlm.config import ConfigError

    with pytest.raises(ConfigError, match="unknown objective 'mdlmm'.*Did you mean 'mdlm'") as exc:
        build_objective("mdlmm", mask_token_id=1)
    assert all(name in str(exc.value) for name in ("ar", "exact_count", "mdlm", "sft"))
