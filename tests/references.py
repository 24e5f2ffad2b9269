"""Independent reference forward passes for LLaDA, Dream and SDAR, plus writers for tiny random checkpoints.

Nothing here imports ``dlm``, on purpose: these functions are the independent side of the converter's
logit-parity tests. Each checkpoint uses its family's own config.json field names and state-dict key names.
Each forward pass follows the family's published modeling file:

- LLaDA: ``modeling_llada.py`` / ``configuration_llada.py`` (GSAI-ML/LLaDA-8B-Base, hub): ``LLaDALlamaBlock``,
  bidirectional attention, gate ``ff_proj``, linear branch ``up_proj``, down ``ff_out``, head ``transformer.ff_out``.
- Dream: ``modeling_dream.py`` / ``configuration_dream.py`` (Dream-org/Dream-v0-Base-7B, hub). This is the Qwen2
  layout with q/k/v biases and bidirectional ``DreamSdpaAttention``. The raw logits are returned unshifted
  (``generation_utils.py`` shifts them afterwards).
- SDAR: ``modeling_sdar.py`` / ``configuration_sdar.py`` (JetAstra/SDAR). This is the Qwen3 layout with per-head
  q/k RMSNorm before RoPE, and the block-causal mask that SDAR's ``generate.py`` builds (blocks from position 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import PreTrainedTokenizerFast

MASK_TOKENS = {"llada": "<|mdm_mask|>", "dream": "<|mask|>", "sdar": "<|MASK|>"}
_LLADA_LAYER = dict(attn_norm="attn_norm.weight", q="q_proj.weight", k="k_proj.weight", v="v_proj.weight",
                    o="attn_out.weight", mlp_norm="ff_norm.weight", gate="ff_proj.weight", up="up_proj.weight",
                    down="ff_out.weight")  # fmt: skip
_QWEN_LAYER = dict(attn_norm="input_layernorm.weight", q="self_attn.q_proj.weight", k="self_attn.k_proj.weight",
                   v="self_attn.v_proj.weight", o="self_attn.o_proj.weight", mlp_norm="post_attention_layernorm.weight",
                   gate="mlp.gate_proj.weight", up="mlp.up_proj.weight", down="mlp.down_proj.weight")  # fmt: skip


def _default_config(family: str, vocab: int, dtype: torch.dtype) -> dict:
    """The family's config.json with tiny sizes; special ids are the top three ids (mask = vocab - 1).

    The real configs' ``auto_map`` is left out (pass it as an override if wanted): with it, a plain
    ``AutoTokenizer.from_pretrained(dir)`` stops to ask whether to trust remote code.
    """
    ids = dict(mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 3)
    dt = str(dtype).removeprefix("torch.")
    if family == "llada":
        return dict(model_type="llada", architectures=["LLaDAModelLM"], d_model=32, n_layers=2,
                    n_heads=4, n_kv_heads=2, multi_query_attention=None, mlp_hidden_size=64, mlp_ratio=4,
                    activation_type="silu", block_type="llama", vocab_size=vocab, embedding_size=vocab, rope=True,
                    rope_theta=500000.0, rope_full_precision=True, layer_norm_type="rms", layer_norm_with_affine=True,
                    bias_for_layer_norm=False, rms_norm_eps=1e-5, include_bias=False, include_qkv_bias=False,
                    attention_layer_norm=False, weight_tying=False, scale_logits=False, input_emb_norm=False,
                    alibi=False, max_sequence_length=128, block_group_size=1, flash_attention=False,
                    use_cache=False, torch_dtype=dt, **ids)  # fmt: skip
    qwen = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128, rope_theta=1000000.0,
                rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                sliding_window=None, attention_dropout=0.0, initializer_range=0.02, use_cache=False, torch_dtype=dt,
                bos_token_id=vocab - 2, **ids)  # fmt: skip
    if family == "dream":
        return dict(model_type="Dream", architectures=["DreamModel"], **qwen)
    if family == "sdar":
        return dict(model_type="sdar", architectures=["SDARForCausalLM"], head_dim=16,
                    attention_bias=False, block_size=4, **qwen)  # fmt: skip
    raise ValueError(f"unknown family {family!r}; expected one of {sorted(MASK_TOKENS)}")


def _dims(family: str, cfg: dict) -> dict:
    """Sizes as each family's modeling code derives them from its config."""
    if family == "llada":
        d, H = cfg["d_model"], cfg["n_heads"]
        kv = 1 if cfg.get("multi_query_attention") else (cfg.get("n_kv_heads") or H)
        return dict(d=d, H=H, KV=kv, hd=d // H, I=cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * d,
                    V=cfg.get("embedding_size") or cfg["vocab_size"], L=cfg["n_layers"], eps=cfg["rms_norm_eps"],
                    theta=cfg["rope_theta"], tied=bool(cfg.get("weight_tying")))  # fmt: skip
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = (cfg.get("head_dim") or d // H) if family == "sdar" else d // H  # Dream has no head_dim field
    return dict(d=d, H=H, KV=cfg.get("num_key_value_heads") or H, hd=hd, I=cfg["intermediate_size"],
                V=cfg["vocab_size"], L=cfg["num_hidden_layers"], eps=cfg["rms_norm_eps"], theta=cfg["rope_theta"],
                tied=bool(cfg.get("tie_word_embeddings")))  # fmt: skip


def _key_map(family: str, cfg: dict) -> dict[str, str]:
    """Canonical parameter name (``embed``, ``head``, ``norm``, ``{i}.q``, ...) -> the family's checkpoint key."""
    if family == "llada":
        top = dict(embed="model.transformer.wte.weight", norm="model.transformer.ln_f.weight",
                   head="model.transformer.ff_out.weight")  # fmt: skip
        layer, prefix = dict(_LLADA_LAYER), "model.transformer.blocks.{}."
    else:
        top = dict(embed="model.embed_tokens.weight", norm="model.norm.weight", head="lm_head.weight")
        layer, prefix = dict(_QWEN_LAYER), "model.layers.{}."
        if family == "dream":
            layer |= {f"{p}_bias": f"self_attn.{p}_proj.bias" for p in "qkv"}
        if family == "sdar":
            layer |= dict(q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")
    dm = _dims(family, cfg)
    if dm["tied"]:
        top.pop("head")
    return top | {f"{i}.{n}": prefix.format(i) + key for i in range(dm["L"]) for n, key in layer.items()}


def _shape(name: str, dm: dict) -> tuple[int, ...]:
    d, q, kv, I, V = dm["d"], dm["H"] * dm["hd"], dm["KV"] * dm["hd"], dm["I"], dm["V"]
    shapes = dict(embed=(V, d), head=(V, d), norm=(d,), attn_norm=(d,), mlp_norm=(d,), q=(q, d), k=(kv, d),
                  v=(kv, d), o=(d, q), gate=(I, d), up=(I, d), down=(d, I), q_bias=(q,), k_bias=(kv,), v_bias=(kv,),
                  q_norm=(dm["hd"],), k_norm=(dm["hd"],))  # fmt: skip
    return shapes[name.split(".")[-1]]


def _write_tokenizer(family: str, cfg: dict, out_dir: Path, mask: bool) -> None:
    """A whitespace WordLevel tokenizer: ``<unk>`` = 0, ``w{i}`` = i, special strings at the eos/pad(/mask) ids."""
    special = {cfg["eos_token_id"]: "<|eos|>", cfg["pad_token_id"]: "<|pad|>"}
    if mask:
        special[cfg["mask_token_id"]] = MASK_TOKENS[family]
    vocab = {"<unk>": 0} | {special.get(i, f"w{i}"): i for i in range(1, cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(special.values()))
    extra = {"mask_token": MASK_TOKENS[family]} if mask else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|eos|>", pad_token="<|pad|>",
                                   **extra)  # fmt: skip
    fast.save_pretrained(out_dir)


def write_checkpoint(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    tokenizer_mask: bool = True,
    **overrides,
) -> dict:
    """Write a tiny random ``family`` checkpoint (config.json, safetensors, tokenizer) to ``out_dir``.

    ``overrides`` use the family's own config field names. Returns the config dict that was written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = _default_config(family, overrides.get("vocab_size", 96), dtype)
    if family == "llada" and "vocab_size" in overrides and "embedding_size" not in overrides:
        cfg["embedding_size"] = overrides["vocab_size"]
    cfg |= overrides
    dm = _dims(family, cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, key in _key_map(family, cfg).items():
        noise = torch.randn(_shape(name, dm), generator=gen)
        if name.endswith("norm"):
            value = 1.0 + 0.1 * noise
        else:
            value = (0.1 if name.endswith("bias") else 0.2) * noise
        tensors[key] = value.to(dtype).contiguous()
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        keys = list(tensors)
        assert 1 < shards <= len(keys), f"shards must be in [1, {len(keys)}]"
        weight_map = {}
        for s in range(shards):
            part = keys[s * len(keys) // shards : (s + 1) * len(keys) // shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in part}, out_dir / fname, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, fname)
        total_size = sum(t.numel() * t.element_size() for t in tensors.values())
        total_params = sum(t.numel() for t in tensors.values())
        index = {"metadata": {"total_parameters": total_params, "total_size": total_size}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(family, cfg, out_dir, tokenizer_mask)
    return cfg


def _load_state_dict(ckpt_dir: Path) -> dict[str, Tensor]:
    """Plain safetensors loading: one ``model.safetensors``, or every shard named by the index."""
    index = ckpt_dir / "model.safetensors.index.json"
    if not index.exists():
        return load_file(ckpt_dir / "model.safetensors")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for f in files for k, v in load_file(ckpt_dir / f).items()}


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF RMSNorm: normalize in fp32 (eps inside the sqrt), cast back to the input dtype, then scale."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _visible_keys(family: str, cfg: dict, pos_BT: Tensor, attention_mask_BT: Tensor | None) -> Tensor:
    """[B, Tq, Tk] bool, True where a query may attend a key."""
    B, T = pos_BT.shape
    vis_BTT = torch.ones(B, T, T, dtype=torch.bool)
    if family == "sdar":  # block-causal, blocks aligned to position 0 (SDAR generate.py)
        blk_BT = pos_BT // cfg["block_size"]
        vis_BTT = blk_BT[:, :, None] >= blk_BT[:, None, :]
    if attention_mask_BT is not None:
        vis_BTT = vis_BTT & attention_mask_BT.bool()[:, None, :]  # pads are never keys
        vis_BTT = vis_BTT | ~vis_BTT.any(-1, keepdim=True)  # a query with no visible key attends everywhere (no NaN)
    return vis_BTT


@torch.no_grad()
def reference_logits(family: str, ckpt_dir: Path, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Raw logits [B, T, V] of the family's own forward pass, computed in fp32 (no shift, even for Dream).

    ``attention_mask`` [B, T] (1 = real, 0 = left pad) hides pad keys, and RoPE positions become
    ``cumsum - 1`` as in Dream's ``generation_utils.py``. The LLaDA hub code ignores masks. Here it gets the same
    key-padding treatment, and because RoPE scores depend only on relative positions, the position offset does not
    change the real tokens' outputs. For SDAR, the blocks are ``position // block_size`` of those positions.
    """
    ckpt_dir = Path(ckpt_dir)
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    sd = _load_state_dict(ckpt_dir)
    w = {name: sd[key].float() for name, key in _key_map(family, cfg).items()}
    dm = _dims(family, cfg)
    H, KV, hd, eps = dm["H"], dm["KV"], dm["hd"], dm["eps"]
    B, T = input_ids.shape
    if attention_mask is None:
        pos_BT = torch.arange(T).expand(B, T)
    else:
        pos_BT = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    vis_B1TT = _visible_keys(family, cfg, pos_BT, attention_mask)[:, None]
    inv_freq = 1.0 / (dm["theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang_BTh = pos_BT[..., None].float() * inv_freq
    emb_B1TD = torch.cat((ang_BTh, ang_BTh), dim=-1)[:, None]  # D = hd
    cos_B1TD, sin_B1TD = emb_B1TD.cos(), emb_B1TD.sin()

    x_BTd = w["embed"][input_ids]
    for i in range(dm["L"]):
        h_BTd = _rms_norm(x_BTd, w[f"{i}.attn_norm"], eps)
        q_BTHD = F.linear(h_BTd, w[f"{i}.q"], w.get(f"{i}.q_bias")).view(B, T, H, hd)
        k_BTKD = F.linear(h_BTd, w[f"{i}.k"], w.get(f"{i}.k_bias")).view(B, T, KV, hd)
        v_BTKD = F.linear(h_BTd, w[f"{i}.v"], w.get(f"{i}.v_bias")).view(B, T, KV, hd)
        if f"{i}.q_norm" in w:  # SDAR / Qwen3 QK-norm: per head over hd, before RoPE
            q_BTHD = _rms_norm(q_BTHD, w[f"{i}.q_norm"], eps)
            k_BTKD = _rms_norm(k_BTKD, w[f"{i}.k_norm"], eps)
        q_BHTD, k_BKTD, v_BKTD = q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2)
        q_BHTD = q_BHTD * cos_B1TD + _rotate_half(q_BHTD) * sin_B1TD
        k_BKTD = k_BKTD * cos_B1TD + _rotate_half(k_BKTD) * sin_B1TD
        k_BHTD = k_BKTD.repeat_interleave(H // KV, dim=1)  # GQA: kv head j serves query heads j*rep..(j+1)*rep-1
        v_BHTD = v_BKTD.repeat_interleave(H // KV, dim=1)
        scores_BHTT = (q_BHTD @ k_BHTD.transpose(-1, -2)) / math.sqrt(hd)
        probs_BHTT = scores_BHTT.masked_fill(~vis_B1TT, float("-inf")).softmax(dim=-1)
        att_BTq = (probs_BHTT @ v_BHTD).transpose(1, 2).reshape(B, T, H * hd)
        x_BTd = x_BTd + F.linear(att_BTq, w[f"{i}.o"])
        h_BTd = _rms_norm(x_BTd, w[f"{i}.mlp_norm"], eps)
        gated_BTI = F.silu(F.linear(h_BTd, w[f"{i}.gate"])) * F.linear(h_BTd, w[f"{i}.up"])
        x_BTd = x_BTd + F.linear(gated_BTI, w[f"{i}.down"])
    x_BTd = _rms_norm(x_BTd, w["norm"], eps)
    return F.linear(x_BTd, w["embed"] if dm["tied"] else w["head"])
