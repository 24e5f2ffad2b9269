"""Build a backbone from a recipe's ``model:`` section, or load a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dlm.config import ConfigError
from dlm.model.configuration import DLMConfig
from dlm.model.modeling import DLMModel


@dataclass(frozen=True)
class ModelConfig:
    init_from: str | None = None
    """Start from this checkpoint: a dlm model or run directory, a checkpoint of a family ``dlm convert``
    knows (LLaDA, Dream, SDAR, Llama, Qwen2/3; converted on the fly), or a hub id. The architecture
    fields below are then ignored. An AR checkpoint adapted to a diffusion objective (A2D) keeps its
    head's convention (``logits_shift``) and takes the objective's attention."""
    hidden_size: int = 256
    intermediate_size: int | None = None
    """SwiGLU width; None = 8/3 · hidden_size rounded up to a multiple of 64."""
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    """Grouped-query attention; None = one K/V head per query head."""
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling_type: Literal["linear", "ntk"] = "linear"
    rope_scaling_factor: float = 1.0
    tie_word_embeddings: bool = True
    attn_backend: Literal["auto", "sdpa", "flash", "flex", "eager"] = "auto"
    """Attention through transformers' interface: auto (flash-attn 2 where it applies, else SDPA), sdpa,
    flash, flex (block-sparse masks: BD3-LM, block-causal), eager (the reference)."""
    gradient_checkpointing: bool = False
    vocab_multiple: int = 64
    """Round the vocabulary up to a multiple of this (faster matmuls); extra rows are never targets."""


def init_checkpoint(name: str) -> Path:
    """The dlm directory of ``model.init_from`` (converting another family's checkpoint once)."""
    import json

    from dlm.loading import converted, locate
    from dlm.model.convert import ConvertError

    try:
        path = locate(name)
        config = json.loads((path / "config.json").read_text())
        return path if config.get("model_type") == "dlm" else converted(path, config)
    except (ConvertError, FileNotFoundError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from None


def model_config(cfg: ModelConfig, vocab_size: int, mask_token_id: int | None = None, **extra) -> DLMConfig:
    """The DLMConfig of a recipe's model section (vocabulary rounded up to ``vocab_multiple``)."""
    padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    try:
        return DLMConfig(
            vocab_size=padded,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta,
            rope_scaling_type=cfg.rope_scaling_type,
            rope_scaling_factor=cfg.rope_scaling_factor,
            tie_word_embeddings=cfg.tie_word_embeddings,
            mask_token_id=mask_token_id,
            attn_backend=cfg.attn_backend,
            **extra,
        )
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from exc


def build_model(cfg: ModelConfig, vocab_size: int, mask_token_id: int, **extra) -> DLMModel:
    if cfg.init_from is not None:
        model = DLMModel.from_pretrained(str(init_checkpoint(cfg.init_from)))
        if model.config.vocab_size < vocab_size:
            model.resize_token_embeddings(vocab_size, pad_to_multiple_of=cfg.vocab_multiple, mean_resizing=False)
        if model.config.mask_token_id is None:
            model.config.mask_token_id = mask_token_id
        elif model.config.mask_token_id != mask_token_id:
            raise ConfigError(
                f"model.init_from was trained with mask_token_id={model.config.mask_token_id} but the "
                f"tokenizer's mask token is {mask_token_id}; use the checkpoint's tokenizer "
                "(tokenizer.name_or_path set to the checkpoint directory)"
            )
    else:
        config = model_config(cfg, vocab_size, mask_token_id, **extra)
        model = DLMModel(config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing = True
    return model
