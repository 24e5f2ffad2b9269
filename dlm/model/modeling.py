"""``DLMModel``: a Llama-style transformer (RoPE, RMSNorm, SwiGLU, grouped-query attention)
whose attention pattern is chosen per forward call.

* ``attn_mode="bidirectional"`` — masked diffusion (MDLM, LLaDA);
* ``attn_mode="causal"`` — the autoregressive baseline on the same weights' architecture;
* ``attn_mode="block_causal"`` with ``block_size`` — block diffusion decoding (BD3-LM);
* a 4-D boolean ``attention_mask`` (True = may attend) — any explicit pattern, e.g. the BD3-LM
  training mask over ``[z_t ⊕ x]`` from :func:`dlm.model.masks.bd3lm`.

A 2-D ``attention_mask`` is the usual padding mask (1 = real token). Left-padded batches get
RoPE positions counted from each row's first real token, so a padded row computes what the
row alone would. ``cache`` (a :class:`~dlm.model.cache.KVCache`) with ``cache_slots`` feeds
only some canvas columns; see ``cache.py``.

Attention runs through transformers' attention interface: SDPA by default, flash-attn 2 when it
is installed, the tensors are on CUDA in half precision and the pattern needs no explicit mask,
flex attention (a block-sparse mask) on request, and an eager reference implementation for tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from dlm.model.cache import KVCache
from dlm.model.configuration import DLMConfig
from dlm.model.masks import structural_mask


@dataclass
class DLMOutput(ModelOutput):
    logits: Tensor | None = None


@dataclass
class AttentionSpec:
    """What every layer needs to attend, computed once per forward."""

    mask: Tensor | None  # [B, 1, Tq, Tk] bool, or None
    is_causal: bool
    slots: Tensor | None  # [B, T] cache slots of the fed tokens, when a cache is used
    block_mask: object | None = None  # the same pattern as a flex-attention BlockMask (attn_backend="flex")


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in HALF and _flash_installed()


@functools.cache
def _flash_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


HALF = (torch.float16, torch.bfloat16)
#: dlm's ``attn_backend`` -> the name of the function in transformers' attention interface
INTERFACE = {"sdpa": "sdpa", "flash": "flash_attention_2", "flex": "flex_attention"}


def attend(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, backend: str, module: nn.Module) -> Tensor:
    """Scaled dot-product attention over ``[B, H, T, D]`` tensors (``k``, ``v`` may have fewer heads),
    returning ``[B, T, H, D]``.

    ``sdpa``, ``flash`` (flash-attn 2) and ``flex`` run transformers' attention-interface functions
    (``transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS``); ``auto`` takes flash-attn when it is
    installed, the tensors are CUDA fp16/bf16 and the pattern needs no mask tensor (bidirectional or
    causal, no padding, no cache), else SDPA. ``eager`` is dlm's reference. What the interface cannot
    express is kept here: the mask of cache slots and of ``[z_t ⊕ x]`` rows is passed to SDPA / flex as
    an explicit boolean mask (flex turns it into a block-sparse ``BlockMask``, built once per forward).
    """
    if backend == "eager":
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if spec.is_causal:
            spec = AttentionSpec(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril(), False, None)
        if spec.mask is not None:
            scores = scores.masked_fill(~spec.mask, float("-inf"))
        return (torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v).transpose(1, 2)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    maskless = spec.mask is None
    if backend == "auto":
        backend = "flash" if maskless and flash_available(q.device, q.dtype) else "sdpa"
    if backend == "flash" and not (maskless and flash_available(q.device, q.dtype)):
        raise RuntimeError(
            "attn_backend='flash' needs flash-attn installed, CUDA tensors in fp16/bf16 and a pattern without "
            "an explicit mask (bidirectional or causal, no padding, no cache); use attn_backend='auto'"
        )
    if backend == "flex" and q.device.type == "cpu":
        # transformers compiles flex attention; torch 2.13's CPU inductor fails to build some of these masks'
        # kernels, so on CPU (tests) the same BlockMask runs through flex attention uncompiled
        import warnings

        from torch.nn.attention.flex_attention import flex_attention

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_attention(q, k, v, block_mask=spec.block_mask, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)
    mask = spec.block_mask if backend == "flex" and spec.block_mask is not None else spec.mask
    out, _ = ALL_ATTENTION_FUNCTIONS[INTERFACE[backend]](
        module, q, k, v, mask, dropout=0.0, scaling=1.0 / math.sqrt(q.shape[-1]), is_causal=spec.is_causal
    )
    return out


def flex_block_mask(mask: Tensor | None, is_causal: bool, q_len: int, kv_len: int, device: torch.device):
    """A flex-attention ``BlockMask`` of a boolean ``[B|1, 1, Tq, Tk]`` mask (or the causal pattern)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if mask is None and not is_causal:
        return None
    if mask is None:
        return create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q_len, kv_len, device=device)
    mask = mask.expand(-1, -1, q_len, kv_len)  # key-only (padding) masks broadcast over the queries
    batch = mask.shape[0]
    rows = (lambda b: b) if batch > 1 else (lambda b: 0)
    return create_block_mask(
        lambda b, h, qi, ki: mask[rows(b), 0, qi, ki], batch if batch > 1 else None, None, q_len, kv_len, device=device
    )


def logits_of(output) -> Tensor:
    """The logits of a model's output: ``.logits`` of an HF-style output, or the output itself
    (a model that returns its logits tensor)."""
    return output.logits if hasattr(output, "logits") else output


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside an engine's wrapper — DDP and DeepSpeed hold it as ``.module``,
    ``torch.compile`` as ``._orig_mod`` — which is where its config and capabilities are read:
    a wrapper does not forward attribute reads, so a DDP-wrapped shifted model would otherwise
    read as unshifted. peft models forward them, and FSDP2 shards in place: both are returned as is."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "DeepSpeedEngine":  # named, not imported: deepspeed is optional
            model = model.module
        elif type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def is_shifted(model: nn.Module) -> bool:
    """The model returns at position ``i`` the distribution of token ``i`` computed from hidden
    state ``i − 1`` (``config.logits_shift``: Dream, converted and adapted AR checkpoints)."""
    return bool(getattr(getattr(unwrapped(model), "config", None), "logits_shift", False))


def supports_output_mask(model: nn.Module) -> bool:
    """The model computes the LM head only at the positions ``output_mask`` names (dlm's own)."""
    return bool(getattr(unwrapped(model), "supports_output_mask", False))


def next_token_logits(logits_BTV: Tensor, shifted: bool) -> Tensor:
    """``[B, T − 1, V]``: the causal model's distributions of tokens ``1..T−1`` given their prefixes.
    An unshifted causal model predicts token ``i + 1`` at position ``i``; a shifted one already
    returns token ``i``'s distribution at ``i``."""
    return logits_BTV[:, 1:] if shifted else logits_BTV[:, :-1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE. dlm's own context extension: ``linear`` divides positions by the factor (position
    interpolation); ``ntk`` raises the base to ``theta · factor^(d/(d-2))``. With ``rope_config``
    (converted checkpoints) the frequencies and the cos/sin scaling come from
    ``transformers.modeling_rope_utils`` (linear, dynamic NTK, yarn, llama3), exactly as
    the source model computes them.

    The frequencies are computed per call rather than kept as a buffer: a non-persistent
    buffer is not restored when transformers materialises a model from the meta device.
    """

    def __init__(self, config: DLMConfig):
        super().__init__()
        dim, base = config.head_dim, config.rope_theta
        factor = config.rope_scaling_factor
        if config.rope_scaling_type == "ntk" and factor > 1 and config.rope_config is None:
            base = base * factor ** (dim / (dim - 2))
        self.dim, self.base = dim, base
        self.position_scale = 1.0 / factor if config.rope_scaling_type == "linear" else 1.0
        self.hf_config = None
        if config.rope_config is not None:
            params = dict(config.rope_config)
            params["rope_type"] = params.pop("type", params.get("rope_type"))
            self.position_scale = 1.0
            if params["rope_type"] != "default":
                self.hf_config = _rope_shim(config, params)

    def inv_freq(self, device: torch.device | None = None, seq_len: int | None = None) -> tuple[Tensor, float]:
        """Inverse frequencies ``[D/2]`` and the factor cos/sin are scaled by."""
        if self.hf_config is not None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            rope_type = self.hf_config.rope_parameters["rope_type"]
            original = self.hf_config.rope_parameters.get("original_max_position_embeddings")
            original = original or self.hf_config.max_position_embeddings
            dynamic = rope_type == "dynamic" and seq_len is not None and seq_len > original
            inv, scale = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, device, seq_len if dynamic else None)
            return inv.float().to(device), float(scale)
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)), 1.0

    def forward(self, position_ids_BT: Tensor) -> tuple[Tensor, Tensor]:
        dynamic = self.hf_config is not None and self.hf_config.rope_parameters["rope_type"] == "dynamic"
        seq_len = int(position_ids_BT.max()) + 1 if dynamic else None  # dynamic NTK rescales with the length
        inv_freq, scale = self.inv_freq(position_ids_BT.device, seq_len)
        angles = position_ids_BT.float()[..., None] * self.position_scale * inv_freq  # [B, T, D/2]
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, D]
        if scale != 1.0:
            return emb.cos() * scale, emb.sin() * scale
        return emb.cos(), emb.sin()


def _rope_shim(config: DLMConfig, params: dict):
    """A transformers config carrying exactly what its RoPE initialisers read (``max_position_embeddings``
    is the pre-training context they scale from)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=params.get("original_max_position_embeddings", config.max_position_embeddings),
        rope_parameters={**params, "rope_theta": config.rope_theta},
    )


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DLMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.o_bias)
        self.num_key_value_groups = self.n_heads // self.n_kv  # read by transformers' attention functions
        self.is_causal = False  # the pattern comes with each call (AttentionSpec)
        if config.qk_norm:  # per-head RMSNorm of queries and keys, before RoPE (Qwen3)
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.backend = config.attn_backend

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, spec: AttentionSpec, cache: KVCache | None, layer: int
    ) -> Tensor:
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(h).view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, spec.slots)
        out = attend(q, k, v, spec, self.backend, self)  # [B, T, H, D]
        return self.o_proj(out.reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: DLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, h, cos, sin, spec, cache, layer):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, spec, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class DLMPreTrainedModel(PreTrainedModel):
    config_class = DLMConfig
    base_model_prefix = "dlm"
    supports_gradient_checkpointing = True
    # attention goes through transformers' attention interface (attn_backend: sdpa, flash, flex; eager)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class DLMModel(DLMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
    #: forward(output_mask=...) returns logits of the selected positions only (decoders use it)
    supports_output_mask = True
    #: forward(cache=KVCache, cache_slots=...) feeds only some canvas columns
    supports_kv_cache = True

    def __init__(self, config: DLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        # transformers' gradient_checkpointing_enable() lands here (its keyword set varies by version);
        # the layer loop in forward() does the checkpointing itself.
        self.gradient_checkpointing = enable

    def attention_spec(
        self,
        batch_size: int,
        seq_len: int,
        attention_mask: Tensor | None,
        cache: KVCache | None,
        cache_slots: Tensor | None,
        attn_mode: str | None,
        block_size: int | None,
        device: torch.device,
    ) -> tuple[AttentionSpec, Tensor]:
        """Build the mask shared by all layers and the default RoPE positions ``[B, T]``."""
        mode = attn_mode or self.config.attention_mode
        block = block_size or self.config.block_size
        explicit = padding = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                padding = attention_mask.bool()
            elif attention_mask.dim() in (3, 4):
                if attn_mode is not None:
                    raise ValueError("pass either attn_mode or an explicit 3-D/4-D attention_mask, not both")
                explicit = attention_mask.bool()
                explicit = explicit[:, None] if explicit.dim() == 3 else explicit
            else:
                raise ValueError(
                    f"attention_mask must be 2-D (padding) or 3/4-D (explicit); got {attention_mask.dim()}-D"
                )

        if cache is None:
            if cache_slots is not None:
                raise ValueError("cache_slots given without a cache")
            q_idx = kv_idx = torch.arange(seq_len, device=device)
            key_valid = padding  # [B, T] or None
            positions = (
                (padding.long().cumsum(-1) - 1).clamp(min=0) if padding is not None else q_idx.expand(batch_size, -1)
            )
            if explicit is None and padding is None and mode in ("bidirectional", "causal"):
                return AttentionSpec(None, mode == "causal", None), positions  # no mask tensor: fastest kernels
        else:
            if cache_slots is None:
                cache_slots = torch.arange(seq_len, device=device).expand(batch_size, -1)
            cache.check_slots(cache_slots)
            cache.mark_valid(cache_slots)
            filled = cache.attended  # keys are read from slots [0, filled) only
            q_idx, kv_idx = cache_slots, torch.arange(filled, device=device)
            key_valid = cache.valid[:, :filled]
            if padding is not None:
                if padding.shape[1] != cache.max_len:
                    raise ValueError(
                        f"with a cache, the padding mask covers the whole canvas ({cache.max_len} columns)"
                    )
                key_valid = key_valid & padding[:, :filled]
                positions = (padding.long().cumsum(-1) - 1).clamp(min=0).gather(1, cache_slots)
            else:
                positions = cache_slots

        if explicit is not None:
            mask = explicit
        else:
            mask = structural_mask(mode, q_idx[..., :, None], kv_idx[None, :] if q_idx.dim() == 2 else kv_idx, block)
            if mask is not None and mask.dim() == 2:
                mask = mask[None]
            if mask is not None:
                mask = mask[:, None]  # [B|1, 1, Tq, Tk]
        if key_valid is not None:
            kv_mask = key_valid[:, None, None, :]
            mask = kv_mask if mask is None else mask & kv_mask
        if cache is not None and not cache.static and bool(mask.all()):
            return AttentionSpec(None, False, cache_slots), positions  # e.g. a block over its full prefix
        # A query that sees no key (a padding row under a causal mask) would give NaN: let it see all.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        return AttentionSpec(mask, False, cache_slots), positions

    def prepare(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        cache_slots: Tensor | None = None,
        attn_mode: str | None = None,
        block_size: int | None = None,
    ) -> tuple[AttentionSpec, Tensor, Tensor]:
        """What every layer of one forward shares: the attention pattern and RoPE's cos/sin.

        The host-side part of a forward (checks, masks, positions); :meth:`trunk` is the part a compiled
        decode runs as a graph (``dlm.decode.compiled``)."""
        B, T = input_ids.shape
        limit = self.config.max_position_embeddings
        if (
            position_ids is None
            and cache is None
            and T > limit
            and not (
                attention_mask is not None and attention_mask.dim() == 2 and int(attention_mask.sum(-1).max()) <= limit
            )
        ):  # left padding takes no positions
            raise ValueError(
                f"input length {T} exceeds the model's max_position_embeddings "
                f"({self.config.max_position_embeddings}); shorten the input or raise rope_scaling_factor"
            )
        spec, default_positions = self.attention_spec(
            B, T, attention_mask, cache, cache_slots, attn_mode, block_size, input_ids.device
        )
        if self.config.attn_backend == "flex":
            kv_len = T if cache is None else cache.attended
            spec.block_mask = flex_block_mask(spec.mask, spec.is_causal, T, kv_len, input_ids.device)
        cos, sin = self.rotary(default_positions if position_ids is None else position_ids)
        return spec, cos, sin

    def trunk(self, input_ids: Tensor, cos: Tensor, sin: Tensor, spec: AttentionSpec, cache: KVCache | None) -> Tensor:
        """The final hidden states ``[B, T, H]`` (embedding, layers, norm): fixed shapes, no host sync."""
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, spec, cache, i, use_reentrant=False)
            else:
                h = layer(h, cos, sin, spec, cache, i)
        return self.norm(h)

    def head(self, h: Tensor, output_mask: Tensor | None = None, logits_from: Tensor | None = None) -> Tensor:
        """Logits of the final hidden states ``h`` ``[B, T, H]``: shifted per ``config.logits_shift`` /
        ``logits_from``, at the ``output_mask`` positions only (``[N, V]``) when given."""
        B, T = h.shape[:2]
        if self.config.logits_shift:
            if logits_from is None:
                h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
            else:
                index = logits_from.expand(B, T) if logits_from.dim() == 1 else logits_from
                h = h.gather(1, index[..., None].expand(-1, -1, h.shape[-1]))
        if output_mask is not None:
            h = h[output_mask]
        return self.lm_head(h)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        cache_slots: Tensor | None = None,
        attn_mode: str | None = None,
        block_size: int | None = None,
        output_mask: Tensor | None = None,
        logits_from: Tensor | None = None,
        return_dict: bool = True,
        **unused,
    ) -> DLMOutput | tuple[Tensor]:
        """Logits ``[B, T, V]``; with ``output_mask`` ``[B, T]`` only the selected rows ``[N, V]``
        (training objectives score only masked positions, saving the LM head elsewhere).

        With ``config.logits_shift`` the logits at ``i`` come from hidden state ``i − 1`` (0 from
        itself); ``logits_from`` (``[T]`` or ``[B, T]`` indices) names another source column per
        position, e.g. the clean half's previous token for the first position of a block in
        ``[z_t ⊕ x]`` rows (:func:`dlm.model.masks.bd3lm_logits_from`). A cached call that feeds
        columns ``[lo, hi)`` must feed the column before the first one whose logits it reads."""
        if unused:
            raise TypeError(f"DLMModel.forward got unexpected arguments: {', '.join(sorted(unused))}")
        spec, cos, sin = self.prepare(input_ids, attention_mask, position_ids, cache, cache_slots, attn_mode, block_size)
        logits = self.head(self.trunk(input_ids, cos, sin, spec, cache), output_mask, logits_from)
        return DLMOutput(logits=logits) if return_dict else (logits,)
