"""The recipe schema: one frozen dataclass per section, validated on construction.

A recipe YAML has the sections below; every key is optional except where noted, and unknown
keys are errors. ``dlm train RECIPE.yaml train.max_steps=100 optim.lr=1e-3`` overrides any
field with a dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from dlm.config import ConfigError
from dlm.data import DataConfig
from dlm.model.build import ModelConfig
from dlm.schedules import SCHEDULES
from dlm.tokenizer import TokenizerConfig


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "loglinear"
    """Noise schedule: loglinear, cosine or polynomial (docs/objectives.md#noise-schedules)."""
    schedule_args: dict[str, float] = field(default_factory=dict)
    """Schedule parameters, e.g. {eps: 1e-3} or {k: 2}."""
    t_eps: float = 1e-3
    """Times are drawn from [t_eps, 1]."""
    antithetic: bool = True
    """Low-discrepancy times (one per stratum of the global batch)."""
    block_size: int | None = None
    """BD3-LM block size (objective=bd3lm); must divide data.seq_len."""
    clip_low: float = 0.0
    clip_high: float = 1.0
    """BD3-LM clipped schedule: training mask rates from U[clip_low, clip_high] (validation: U[0, 1])."""

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            from dlm.registry import close_matches

            raise ConfigError(
                f"diffusion.schedule={self.schedule!r}; known schedules: "
                f"{', '.join(SCHEDULES.names())}." + close_matches(self.schedule, SCHEDULES.names())
            )
        if not 0.0 <= self.t_eps < 1.0:
            raise ConfigError(f"diffusion.t_eps={self.t_eps} must lie in [0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr · min_lr_ratio."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    """Applied to matrices only (not norms or biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/quickstart"
    max_steps: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 16
    """Rows per process per forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size · grad_accum · processes."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema_decay: float = 0.0
    """EMA of the weights used for validation and export (MDLM pretraining: 0.9999); 0 disables."""
    eval_every: int = 100
    eval_batch_size: int = 32
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: str = "auto"
    """``auto`` resumes from the newest checkpoint in output_dir if there is one; ``never``; or a checkpoint path."""
    trackers: list[str] = field(default_factory=lambda: ["auto"])
    """accelerate trackers (tensorboard, wandb, ...); ``auto`` = tensorboard when installed.
    A JSONL log (output_dir/log.jsonl) is always written."""
    plot: bool = True
    """Write curves.png (loss and validation bound) at the end."""
    num_threads: int | None = None
    """torch CPU threads per process; None leaves torch's default."""

    def __post_init__(self):
        for name in (
            "max_steps",
            "micro_batch_size",
            "grad_accum",
            "eval_every",
            "eval_batch_size",
            "save_every",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must lie in [0, 1) (0 disables EMA)")


@dataclass(frozen=True)
class SampleConfig:
    """Samples printed at the end of training (ancestral sampler, docs/decoders.md)."""

    num_samples: int = 3
    gen_length: int = 128
    steps: int = 128
    temperature: float = 1.0
    prompt: str = ""


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters through peft (``lora.r > 0``): only the adapters train; the frozen base
    doubles as the KL reference (adapters switched off), so no second model copy is held."""

    r: int = 0
    """Adapter rank; 0 = off (full fine-tuning)."""
    alpha: float = 16.0
    dropout: float = 0.0
    """Adapter dropout. Above 0 the rollout-time (eval) and update-time (train) log-probs differ, so
    the first ratio is no longer exactly 1."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``all-linear`` (every linear layer but the LM head)."""

    def __post_init__(self):
        if self.r < 0:
            raise ConfigError(f"lora.r={self.r} must be >= 0 (0 turns LoRA off)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def wrap(self, model):
        """``model`` with fresh adapters (a peft ``PeftModel``; the base weights frozen)."""
        try:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model
        except ImportError as exc:
            raise ConfigError('lora.r > 0 needs peft: pip install "dlm[rl]"') from exc
        cfg = PeftLoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules
        )
        try:
            return get_peft_model(model, cfg)
        except ValueError as exc:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"lora.target_modules={self.target_modules!r}: {exc}; linear layers: {names}") from None


@dataclass(frozen=True)
class RecipeConfig:
    seed: int = 0
    objective: str = "mdlm"
    """mdlm, exact_count, sft or ar."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        from dlm.train.objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            from dlm.registry import close_matches

            raise ConfigError(
                f"objective={self.objective!r}; known objectives: {', '.join(OBJECTIVES.names())}."
                + close_matches(self.objective, OBJECTIVES.names())
            )
        if self.model.init_from is None and self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}; lower data.seq_len or raise model.max_position_embeddings"
            )
        if self.objective == "bd3lm":
            block = self.diffusion.block_size
            if not block or self.data.seq_len % block:
                raise ConfigError(
                    f"objective=bd3lm: diffusion.block_size={block} must be a positive divisor of "
                    f"data.seq_len={self.data.seq_len}"
                )
        if self.objective == "sft" and self.data.format != "chat":
            raise ConfigError("objective=sft needs data.format=chat (prompt/response or messages fields)")
