import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from conftest import tiny_config, tiny_model
from dlm.model import DLMConfig, DLMModel, KVCache, masks


def set_backend(model: DLMModel, backend: str) -> DLMModel:
    model.config.attn_backend = backend
    for layer in model.layers:
        layer.self_attn.backend = backend
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_auto_model_round_trip_gives_identical_logits(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dlm"
    x = torch.randint(0, 63, (2, 12))
    for loader in (AutoModel, AutoModelForMaskedLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, DLMModel)
        assert loaded.config.mask_token_id == 63
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert (loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()) is tied


def test_causal_mode_ignores_the_future_and_bidirectional_does_not(model):
    x = torch.randint(0, 63, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 63
    causal_x, causal_y = model(x, attn_mode="causal").logits, model(y, attn_mode="causal").logits
    assert torch.equal(causal_x[:, :7], causal_y[:, :7])
    assert not torch.allclose(causal_x[:, 7:], causal_y[:, 7:])
    bi_x, bi_y = model(x).logits, model(y).logits
    assert not torch.allclose(bi_x[:, :7], bi_y[:, :7])


@pytest.mark.parametrize("mode, block", [("causal", None), ("block_causal", 4), ("bidirectional", None)])
def test_explicit_mask_equals_named_mode(model, mode, block):
    T = 12
    x = torch.randint(0, 63, (2, T))
    idx = torch.arange(T)
    explicit = masks.structural_mask(mode, idx[:, None], idx[None, :], block)
    if explicit is None:
        explicit = torch.ones(T, T, dtype=torch.bool)
    named = model(x, attn_mode=mode, block_size=block).logits
    torch.testing.assert_close(model(x, attention_mask=explicit[None, None].expand(2, 1, T, T)).logits, named)


def test_block_causal_blocks_see_their_own_block_and_earlier(model):
    x = torch.randint(0, 63, (1, 12))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 63  # block 2 of size 4 (positions 8..11)
    a, b = (
        model(x, attn_mode="block_causal", block_size=4).logits,
        model(y, attn_mode="block_causal", block_size=4).logits,
    )
    assert torch.equal(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_bd3lm_mask_matches_hand_written_matrix():
    L, B = 4, 2  # input [z_t ⊕ x]: indices 0..3 noisy, 4..7 clean; blocks {0,1}, {2,3} in each half
    idx = torch.arange(2 * L)
    got = masks.bd3lm(idx[:, None], idx[None, :], L, B).int()
    expected = torch.tensor(
        [
            # z0 z1 z2 z3 x0 x1 x2 x3
            [1, 1, 0, 0, 0, 0, 0, 0],  # z0: own noisy block
            [1, 1, 0, 0, 0, 0, 0, 0],  # z1
            [0, 0, 1, 1, 1, 1, 0, 0],  # z2: own noisy block + clean block 0
            [0, 0, 1, 1, 1, 1, 0, 0],  # z3
            [0, 0, 0, 0, 1, 1, 0, 0],  # x0: clean block-causal
            [0, 0, 0, 0, 1, 1, 0, 0],  # x1
            [0, 0, 0, 0, 1, 1, 1, 1],  # x2
            [0, 0, 0, 0, 1, 1, 1, 1],  # x3
        ]
    )
    assert torch.equal(got, expected)


def test_bd3lm_mask_runs_through_the_model(model):
    L = 8
    x = torch.randint(0, 63, (2, 2 * L))
    idx = torch.arange(2 * L)
    mask = masks.bd3lm(idx[:, None], idx[None, :], L, 4)
    positions = torch.cat([torch.arange(L), torch.arange(L)]).expand(2, -1)
    logits = model(x, attention_mask=mask[None, None], position_ids=positions).logits
    assert logits.shape == (2, 2 * L, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "block_causal"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()  # flex attention has no CPU backward
def test_eager_reference_matches_the_attention_interface_with_padding_and_gqa(mode, backend):
    model = tiny_model(num_attention_heads=4, num_key_value_heads=2)
    x = torch.randint(0, 63, (3, 10))
    pad = torch.ones(3, 10, dtype=torch.long)
    pad[1, :3] = 0
    pad[2, :6] = 0
    fast = set_backend(model, backend)(x, attention_mask=pad, attn_mode=mode, block_size=4).logits
    eager = set_backend(model, "eager")(x, attention_mask=pad, attn_mode=mode, block_size=4).logits
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)
    if backend == "flex":  # the BD3-LM [z ⊕ x] mask as a block-sparse flex mask
        L = 8
        idx = torch.arange(2 * L)
        bd3 = masks.bd3lm(idx[:, None], idx[None, :], L, 4)[None, None]
        pos = (idx % L).expand(2, -1)
        y = torch.randint(0, 63, (2, 2 * L))
        flex = set_backend(model, "flex")(y, attention_mask=bd3, position_ids=pos).logits
        eager = set_backend(model, "eager")(y, attention_mask=bd3, position_ids=pos).logits
        torch.testing.assert_close(flex, eager, atol=1e-5, rtol=1e-5)


def test_auto_takes_flash_attention_only_for_patterns_without_a_mask(monkeypatch):
    """The GPU dispatch, checked on CPU: a recording stand-in for transformers' flash-attn function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import dlm.model.modeling as modeling

    calls = []

    def fake_flash(module, q, k, v, mask, **kw):
        calls.append((mask is None, kw["is_causal"]))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", fake_flash)
    monkeypatch.setattr(modeling, "flash_available", lambda device, dtype: True)
    model = tiny_model()
    x = torch.randint(0, 63, (2, 8))
    pad = torch.ones(2, 8, dtype=torch.long)
    pad[1, :2] = 0
    ref = set_backend(tiny_model(), "eager")(x, attn_mode="causal").logits
    torch.testing.assert_close(model(x, attn_mode="causal").logits, ref, atol=1e-5, rtol=1e-5)
    assert calls == [(True, True)] * 2  # both layers, maskless and causal
    calls.clear()
    model(x, attention_mask=pad)  # padding needs a mask tensor: SDPA
    model(x, attn_mode="block_causal", block_size=4)
    assert calls == []
    with pytest.raises(RuntimeError, match="attn_backend='flash' needs flash-attn installed"):
        set_backend(model, "flash")(x, attention_mask=pad)


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_left_padded_row_equals_the_row_alone(model, mode):
    a, b = torch.randint(0, 63, (1, 9)), torch.randint(0, 63, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :4] = 0
    out = model(batch, attention_mask=pad, attn_mode=mode).logits
    torch.testing.assert_close(out[0], model(a, attn_mode=mode).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:], model(b, attn_mode=mode).logits[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_token_by_token_equals_full_causal_forward(model):
    x = torch.randint(0, 63, (2, 10))
    full = model(x, attn_mode="causal").logits
    cache = KVCache.for_model(model, batch_size=2, max_len=10)
    step = [model(x[:, :4], attn_mode="causal", cache=cache, cache_slots=torch.arange(4).expand(2, -1)).logits]
    for t in range(4, 10):
        step.append(model(x[:, t : t + 1], attn_mode="causal", cache=cache, cache_slots=torch.full((2, 1), t)).logits)
    torch.testing.assert_close(torch.cat(step, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_position_indexed_writes_in_any_order(model):
    """A bidirectional cache filled in shuffled chunks, then a block re-fed, equals the full forward."""
    x = torch.randint(0, 63, (2, 12))
    full = model(x).logits
    cache = KVCache.for_model(model, batch_size=2, max_len=12)
    order = torch.tensor([7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6])
    for chunk in order.split(4):  # later chunks see the earlier ones only, so outputs differ ...
        model(x[:, chunk], cache=cache, cache_slots=chunk.expand(2, -1))
    # ... but once every slot holds the K/V a full pass computes (layer 0 is exact; iterate to a fixed point)
    for _ in range(model.config.num_hidden_layers):
        model(x, cache=cache, cache_slots=torch.arange(12).expand(2, -1))
    block = torch.arange(4, 8)
    out = model(x[:, block], cache=cache, cache_slots=block.expand(2, -1)).logits
    torch.testing.assert_close(out, full[:, 4:8], atol=1e-5, rtol=1e-5)
    assert bool(cache.valid.all())


def test_kv_cache_prefix_then_suffix_block(model):
    """Prefix cache: K/V of x[:8] from a full pass; feeding x[8:] reproduces the full causal logits."""
    x = torch.randint(0, 63, (1, 12))
    full = model(x, attn_mode="causal").logits
    cache = KVCache.for_model(model, 1, 12)
    model(x[:, :8], attn_mode="causal", cache=cache, cache_slots=torch.arange(8)[None])
    out = model(x[:, 8:], attn_mode="causal", cache=cache, cache_slots=torch.arange(8, 12)[None]).logits
    torch.testing.assert_close(out, full[:, 8:], atol=1e-5, rtol=1e-5)


def test_cache_rejects_out_of_range_slots(model):
    cache = KVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match=r"cache slots must lie in \[0, 4\)"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache, cache_slots=torch.tensor([[3, 4]]))


def test_output_mask_selects_rows(model):
    x = torch.randint(0, 63, (2, 6))
    sel = torch.rand(2, 6) < 0.5
    torch.testing.assert_close(model(x, output_mask=sel).logits, model(x).logits[sel], atol=1e-6, rtol=1e-6)


def test_rope_linear_scaling_interpolates_positions():
    plain = tiny_model().rotary
    scaled = tiny_model(rope_scaling_factor=2.0).rotary
    p = torch.arange(0, 20, 2)[None]
    torch.testing.assert_close(scaled(p)[0], plain(p // 2)[0])
    ntk = tiny_model(rope_scaling_type="ntk", rope_scaling_factor=4.0).rotary
    assert ntk.inv_freq()[0][-1] < plain.inv_freq()[0][-1]  # a larger base stretches the low frequencies


def test_input_longer_than_context_is_an_error(model):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 63, (2, 8))
    grads = []
    for ckpt in (False, True):
        m = tiny_model().train()
        m.gradient_checkpointing = ckpt
        m(x).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"attention_mode": "sideways"}, "attention_mode='sideways'"),
        ({"attention_mode": "block_causal"}, "needs block_size"),
        ({"mask_token_id": 64}, "outside the vocabulary"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kw)


def test_bf16_forward_runs_on_cpu(model):
    out = model.to(torch.bfloat16)(torch.randint(0, 63, (1, 8))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flash_attention_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    torch.manual_seed(0)
    cfg = DLMConfig(
        vocab_size=256,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mask_token_id=255,
    )
    model = DLMModel(cfg).cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, 255, (2, 64), device="cuda")
    for mode in ("bidirectional", "causal"):
        flash = set_backend(model, "flash")(x, attn_mode=mode).logits.float()
        sdpa = set_backend(model, "sdpa")(x, attn_mode=mode).logits.float()
        torch.testing.assert_close(flash, sdpa, atol=3e-2, rtol=3e-2)


def test_structural_masks_compare_mode_names_by_value():
    """A mode name read from a config is an equal string, not the same object as dlm's literal."""
    idx = torch.arange(6)
    mode = "".join(["bi", "directional"])
    assert masks.structural_mask(mode, idx[:, None], idx[None, :], None) is None
    causal = "".join(["cau", "sal"])
    assert torch.equal(
        masks.structural_mask(causal, idx[:, None], idx[None, :], None), masks.causal(idx[:, None], idx[None, :])
    )
    blocks = "".join(["block_", "causal"])
    assert torch.equal(
        masks.structural_mask(blocks, idx[:, None], idx[None, :], 2), masks.block_causal(idx[:, None], idx[None, :], 2)
    )


def test_an_unknown_attention_mode_is_an_error_whatever_its_spelling():
    """Names that sort before, between or after the known modes are refused, never read as one."""
    from dlm.model.masks import structural_mask

    q = torch.arange(4)[:, None]
    for mode in ("", "auto", "bidirectional_", "block", "causal2", "zigzag"):
        with pytest.raises(ValueError, match="choose bidirectional, causal or block_causal"):
            structural_mask(mode, q, q.T, 2)
