"""``DLMConfig``: the transformer backbone's hyper-parameters, an HF ``PretrainedConfig``."""

from __future__ import annotations

from transformers import PretrainedConfig

ATTENTION_MODES = ("bidirectional", "causal", "block_causal")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flex", "eager")
ROPE_SCALING_TYPES = ("linear", "ntk")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # rope_config (transformers')


class DLMConfig(PretrainedConfig):
    """Llama-style backbone (RoPE, RMSNorm, SwiGLU, GQA) usable as a masked diffusion model,
    a block diffusion model or an autoregressive model, chosen by ``attention_mode``."""

    model_type = "dlm"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rope_scaling_type: str = "linear",
        rope_scaling_factor: float = 1.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        mask_token_id: int | None = None,
        attention_mode: str = "bidirectional",
        block_size: int | None = None,
        attn_backend: str = "auto",
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        rope_config: dict | None = None,
        logits_shift: bool = False,
        **kwargs,
    ):
        """Fields beyond the Llama core, each off by default (they let converted checkpoints run):

        * ``qkv_bias`` — biases on the query/key/value projections (Qwen2, Dream);
        * ``o_bias`` — a bias on the attention output projection (Llama with ``attention_bias``);
        * ``qk_norm`` — RMSNorm over each head's queries and keys before RoPE (Qwen3, SDAR);
        * ``rope_config`` — a transformers RoPE parameter dict (``{"rope_type": "yarn" | "llama3" |
          "dynamic" | "linear", ...}``), computed by ``transformers.modeling_rope_utils``;
          None keeps dlm's own ``rope_scaling_type`` / ``rope_scaling_factor``;
        * ``logits_shift`` — the model returns at position ``i`` the distribution of token ``i``
          computed from hidden state ``i − 1`` (Dream, AR checkpoints adapted to diffusion); position
          0, which has no predecessor, reuses its own hidden state (Dream's choice).
        """
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                    f"({num_attention_heads}), or set head_dim explicitly"
                )
            head_dim = hidden_size // num_attention_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads}) for grouped-query attention"
            )
        if intermediate_size is None:  # SwiGLU's 8/3 expansion, rounded up to a multiple of 64
            intermediate_size = -(-int(8 * hidden_size / 3) // 64) * 64
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode={attention_mode!r}; choose one of {ATTENTION_MODES}")
        if attention_mode == "block_causal" and not block_size:
            raise ValueError("attention_mode='block_causal' needs block_size (a positive integer)")
        if attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend={attn_backend!r}; choose one of {ATTENTION_BACKENDS}")
        if rope_scaling_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling_type={rope_scaling_type!r}; choose one of {ROPE_SCALING_TYPES}")
        if rope_scaling_factor < 1.0:
            raise ValueError(f"rope_scaling_factor={rope_scaling_factor} must be >= 1 (1 = no scaling)")
        if rope_config is not None:
            rope_type = rope_config.get("rope_type", rope_config.get("type"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_config rope_type={rope_type!r}; choose one of {ROPE_TYPES}")
        if mask_token_id is not None and not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling_type = rope_scaling_type
        self.rope_scaling_factor = rope_scaling_factor
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.attention_mode = attention_mode
        self.block_size = block_size
        self.attn_backend = attn_backend
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.qk_norm = qk_norm
        self.rope_config = rope_config
        self.logits_shift = logits_shift
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
