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
    pretrained: str | None = None
    """A dlm checkpoint directory to start from; the architecture fields below are then ignored."""
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
    attn_backend: Literal["auto", "sdpa", "flash", "eager"] = "auto"
    gradient_checkpointing: bool = False
    vocab_multiple: int = 64
    """Round the vocabulary up to a multiple of this (faster matmuls); extra rows are never targets."""


def build_model(cfg: ModelConfig, vocab_size: int, mask_token_id: int, **extra) -> DLMModel:
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained: {cfg.pretrained!r} is not a checkpoint directory "
                "(no config.json); give the path of a saved dlm model"
            )
        model = DLMModel.from_pretrained(str(path))
        if model.config.vocab_size < vocab_size:
            model.resize_token_embeddings(vocab_size, pad_to_multiple_of=cfg.vocab_multiple, mean_resizing=False)
        if model.config.mask_token_id is None:
            model.config.mask_token_id = mask_token_id
        elif model.config.mask_token_id != mask_token_id:
            raise ConfigError(
                f"model.pretrained was trained with mask_token_id={model.config.mask_token_id} but the "
                f"tokenizer's mask token is {mask_token_id}; use the checkpoint's tokenizer "
                "(tokenizer.name_or_path set to the checkpoint directory)"
            )
    else:
        padded = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
        try:
            config = DLMConfig(
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
        model = DLMModel(config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing = True
    return model
