import math

import pytest
import torch

from dlm.config import ConfigError
from dlm.schedules import SCHEDULES, build_schedule, sample_times

ALL = [
    ("loglinear", {"eps": 0.0}),
    ("loglinear", {"eps": 1e-3}),
    ("cosine", {"eps": 0.0}),
    ("cosine", {"eps": 1e-3}),
    ("polynomial", {"k": 1.0}),
    ("polynomial", {"k": 3.0}),
]


@pytest.mark.parametrize("name, kw", ALL)
def test_weight_is_minus_dalpha_over_one_minus_alpha(name, kw):
    sched = build_schedule(name, **kw)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    alpha = sched.alpha(t)
    (dalpha,) = torch.autograd.grad(alpha.sum(), t)
    expected = -dalpha / (1 - alpha)  # for the eps-schedules the (1 - eps) factors cancel exactly
    torch.testing.assert_close(sched.weight(t.detach()), expected.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name, kw", ALL)
def test_alpha_endpoints_and_inverse(name, kw):
    sched = build_schedule(name, **kw)
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    assert sched.alpha(t[:1]).item() == pytest.approx(1.0)
    assert sched.alpha(t[-1:]).item() == pytest.approx(kw.get("eps", 0.0), abs=1e-12)
    torch.testing.assert_close(sched.alpha_inverse(sched.alpha(t)), t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, kw", ALL)
def test_alpha_inverse_clamps_to_the_time_interval_outside_the_schedules_range(name, kw):
    """α values a hair outside [α(1), 1] (float rounding in a caller) map to t = 0 or 1, never NaN
    or a time outside [0, 1]."""
    sched = build_schedule(name, **kw)
    low = sched.alpha(torch.ones(1, dtype=torch.float64))
    assert sched.alpha_inverse(torch.tensor([1.05], dtype=torch.float64)).item() == 0.0
    assert sched.alpha_inverse(low - 0.05).item() == 1.0
    assert sched.alpha_inverse(low - 1.5).item() == 1.0  # far outside too (arccos's domain ends at -1)


def test_schedules_are_immutable_and_their_defaults_are_the_papers():
    """A schedule is shared by the objective and the decoders: it cannot be changed
    under them. Defaults: ε = 1e-3 (MDLM) and MD4's quadratic k = 2."""
    import dataclasses

    for name in SCHEDULES.names():
        sched = build_schedule(name)
        field = dataclasses.fields(sched)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(sched, field, 0.5)
    assert build_schedule("loglinear").eps == build_schedule("cosine").eps == 1e-3
    assert build_schedule("polynomial").alpha(torch.tensor([0.5])).item() == 0.75


def test_closed_form_weights():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(build_schedule("loglinear").weight(t), 1 / t)
    torch.testing.assert_close(build_schedule("polynomial", k=2.0).weight(t), 2 / t)
    cos = build_schedule("cosine")
    torch.testing.assert_close(
        cos.weight(t), (math.pi / 2) * torch.sin(math.pi * t / 2) / (1 - torch.cos(math.pi * t / 2))
    )


@pytest.mark.parametrize("n", [1, 7, 64])
def test_antithetic_times_one_per_stratum(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(20):
        t = sample_times(n, g, 0.0, antithetic=True)
        strata = torch.sort((t * n).floor().long()).values
        assert torch.equal(strata, torch.arange(n))


def test_times_lie_in_eps_one():
    t = sample_times(1000, torch.Generator().manual_seed(0), 0.25, antithetic=False)
    assert t.min() >= 0.25 and t.max() <= 1.0


def test_schedule_errors():
    with pytest.raises(ConfigError, match="known schedules: cosine, loglinear, polynomial"):
        build_schedule("cosin")
    with pytest.raises(ConfigError, match=r"has no parameter 'kk'; its parameters: k\..*Did you mean 'k'"):
        build_schedule("polynomial", kk=2)
    for name in ("loglinear", "cosine"):
        for eps in (1.5, 1.0, -0.1):
            with pytest.raises(ConfigError, match=f"{name} schedule: eps={eps} must lie in"):
                build_schedule(name, eps=eps)
        build_schedule(name, eps=float("0.0"))  # 0 is allowed (LLaDA's linear schedule), read from text or not
    for k in (0.0, -1.0):
        with pytest.raises(ConfigError, match=f"k={k} must be positive"):
            build_schedule("polynomial", k=k)
    assert set(SCHEDULES.names()) == {"loglinear", "cosine", "polynomial"}
