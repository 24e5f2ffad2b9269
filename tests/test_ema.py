"""EMA of the weights (train/ema.py): closed-form values, direction, swap-in and state."""

import pytest
import torch
from torch import nn

from dlm.train.ema import EMA


def linear(value: float) -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return layer


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_shadow_after_n_updates_toward_a_constant_is_c_plus_p0_minus_c_times_decay_to_the_n(decay):
    p0, c, n = 2.0, -1.0, 25
    model = linear(p0)
    ema = EMA(model, decay)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(c)
    for _ in range(n):
        ema.update(model)
    expected = c + (p0 - c) * decay**n
    for name, shadow in ema.shadow.items():
        torch.testing.assert_close(shadow, torch.full_like(shadow, expected), rtol=1e-6, atol=1e-6, msg=name)


def test_each_update_moves_the_shadow_toward_the_weights_by_one_minus_decay():
    """shadow_k = decay·shadow_{k−1} + (1 − decay)·θ_k, against a float64 recursion over changing
    weights; each step closes the gap to the new weights by the factor decay, never widens it."""
    torch.manual_seed(0)
    model, decay = nn.Linear(4, 3), 0.8
    ema = EMA(model, decay)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        gap_before = {n: (ema.shadow[n].double() - p.detach().double()) for n, p in model.named_parameters()}
        ema.update(model)
        for name, p in model.named_parameters():
            ref[name] = decay * ref[name] + (1 - decay) * p.detach().double()
            torch.testing.assert_close(ema.shadow[name].double(), ref[name], rtol=1e-5, atol=1e-5)
            gap_after = ema.shadow[name].double() - p.detach().double()
            # toward the weights, on the same side, by the factor decay
            torch.testing.assert_close(gap_after, decay * gap_before[name], rtol=1e-5, atol=1e-5)


def test_swapped_in_loads_the_shadow_and_restores_the_weights():
    model = linear(1.0)
    ema = EMA(model, 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    ema.update(model)  # shadow = 0.5·1 + 0.5·3 = 2
    with ema.swapped_in(model):
        assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in model.parameters())
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in model.parameters())
    again = EMA(linear(0.0), 0.5)
    again.load_state_dict(ema.state_dict())
    assert all(torch.equal(again.shadow[n], ema.shadow[n]) for n in ema.shadow)


def test_frozen_parameters_are_not_tracked():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    assert set(EMA(model, 0.9).shadow) == {"0.bias", "1.weight", "1.bias"}


def test_loading_a_state_names_the_first_missing_parameter_and_ignores_extra_ones():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ema = EMA(model, 0.9)
    state = {name: torch.full_like(t, 3.0) for name, t in ema.state_dict().items()}
    ema.load_state_dict({**state, "extra.weight": torch.zeros(1)})  # extra entries are not an error
    assert all(bool((t == 3.0).all()) for t in ema.shadow.values())
    for dropped in (["1.weight"], ["1.weight", "0.bias"]):  # the message names the first missing name
        partial = {k: v for k, v in state.items() if k not in dropped}
        with pytest.raises(ValueError, match=f"lacks {len(dropped)} parameters, e.g. {sorted(dropped)[0]}$"):
            ema.load_state_dict(partial)


def test_the_shadow_follows_a_model_moved_after_the_ema_was_built():
    """accelerate.prepare moves the model after the loop could build the EMA: the shadow must
    follow (on a GPU run the first update would otherwise mix devices). On CPU the other device
    is meta."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    model.to("meta")
    ema.update(model)
    assert {t.device.type for t in ema.shadow.values()} == {"meta"}
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())


def test_sharded_parameters_keep_an_fp32_shadow_of_their_local_shard():
    """A parameter that holds only a local shard (a DTensor under FSDP2) is tracked by its shard."""

    class Shard(torch.nn.Parameter):
        def to_local(self):
            return self.data[:1]  # this process holds row 0

    model = torch.nn.Linear(2, 2, bias=False)
    model.weight = Shard(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16))
    ema = EMA(model, 0.5)
    assert ema.shadow["weight"].shape == (1, 2) and ema.shadow["weight"].dtype == torch.float32
    with torch.no_grad():
        model.weight.data[0] = torch.tensor([3.0, 4.0])
    ema.update(model)
    assert ema.shadow["weight"].tolist() == [[2.0, 3.0]]
    with ema.swapped_in(model):
        assert model.weight.data.tolist() == [[2.0, 3.0], [3.0, 4.0]]  # only the local shard is swapped
    assert model.weight.data.tolist() == [[3.0, 4.0], [3.0, 4.0]]


def test_fsdp2_modules_are_resharded_before_the_shadow_reads_their_parameters(monkeypatch):
    """A root FSDP2 module keeps its parameters gathered after a forward: the EMA reshards every
    FSDP2 module first (update and both ends of swapped_in), so it reads and writes the local shards."""
    import torch.distributed.fsdp as fsdp

    events = []

    class Shard(torch.nn.Parameter):
        def to_local(self):
            events.append("read")
            return self.data

    class Sharded(nn.Linear):  # stands in for the class fully_shard() gives a module
        def reshard(self):
            events.append("reshard")

    monkeypatch.setattr(fsdp, "FSDPModule", Sharded)
    model = nn.Sequential(Sharded(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[0].weight = Shard(torch.ones(2, 2))
    ema = EMA(model, 0.5)
    events.clear()
    ema.update(model)
    assert events == ["reshard", "read"]
    events.clear()
    with ema.swapped_in(model):
        assert events == ["reshard", "read"]
    assert events[2] == "reshard"
