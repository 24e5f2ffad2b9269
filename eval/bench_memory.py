"""Memory plan: what one GPU holds when a recipe trains under DDP, FSDP2, ZeRO-2 and ZeRO-3.

    dlm bench memory recipes/sft-llada-8b.yaml --gpus 8 --gpu-memory 80
    dlm bench memory recipes/quickstart.yaml --accelerate-config recipes/accelerate/fsdp2.yaml

The model is built on the meta device (nothing is allocated; ``--shape`` names a benchmark shape
when the recipe starts from a hub checkpoint), and the arithmetic is the standard one for mixed
precision AdamW training (accelerate's autocast keeps fp32 master weights; DeepSpeed keeps bf16
weights plus an fp32 master copy), per GPU for P parameters over N GPUs:

| engine | parameters | gradients | optimizer (AdamW m, v) |
|---|---|---|---|
| DDP | 4P | 4P | 8P |
| FSDP2 (full shard, fp32 params, bf16 compute) | 4P/N + 2·2·P_layer (gathered units) | 4P/N | 8P/N |
| ZeRO-2 (bf16 params, fp32 master) | 2P + 4P/N | 2P/N | 8P/N |
| ZeRO-3 | 2P/N + 4P/N + 2·2·P_layer | 2P/N | 8P/N |

Activations per micro-batch of b rows of s tokens, L layers of width h, bf16, attention through
SDPA/flash (no s² term): 34·s·b·h bytes per layer (Korthikanti et al., 2022, with the SwiGLU MLP's
third matrix counted: + 2·s·b·i), or with gradient checkpointing 2·s·b·h per layer plus one
layer's full activations; plus the LM head's logits on the scored positions (fp32 log-softmax:
6 bytes per position per vocabulary entry; masked-diffusion objectives score about half the
positions, AR every one). Figures are estimates to plan with: allocator fragmentation, CUDA context
(~0.5–1 GB) and communication buffers come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlm.utils import write_json

GB = 2**30
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass(frozen=True)
class Plan:
    engine: str
    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def model_sizes(config) -> dict[str, int]:
    """Parameter count, the largest decoder layer's, and the shape fields the plan needs."""
    import torch

    from dlm.model import DLMModel

    with torch.device("meta"):
        model = DLMModel(config)
    total = sum(p.numel() for p in model.parameters())
    layer = max(sum(p.numel() for p in blk.parameters()) for blk in model.layers)
    return {
        "params": total,
        "layer_params": layer,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "vocab": config.vocab_size,
    }


def activations(sizes: dict, rows: int, seq: int, checkpointing: bool, scored: float) -> float:
    """Bytes of activations of one micro-batch (bf16) plus the LM head's logits and log-softmax."""
    h, i, L = sizes["hidden"], sizes["intermediate"], sizes["layers"]
    full_layer = (34 * h + 2 * i) * seq * rows
    stored = (2 * h * seq * rows * L + full_layer) if checkpointing else full_layer * L
    logits = 6 * sizes["vocab"] * seq * rows * scored
    return stored + logits


def plan(engine: str, sizes: dict, gpus: int, act: float) -> Plan:
    P, layer, n = sizes["params"], sizes["layer_params"], gpus
    gathered = 2 * 2 * layer  # two units of bf16 weights gathered at once (the one running, the next prefetched)
    if engine == "ddp":
        return Plan(engine, 4 * P, 4 * P, 8 * P, act)
    if engine == "fsdp2":
        return Plan(engine, 4 * P / n + gathered, 4 * P / n, 8 * P / n, act)
    if engine == "zero2":
        return Plan(engine, 2 * P + 4 * P / n, 2 * P / n, 8 * P / n, act)
    if engine == "zero3":
        return Plan(engine, 6 * P / n + gathered, 2 * P / n, 8 * P / n, act)
    raise ValueError(f"engine {engine!r}; choose one of {', '.join(ENGINES)}")


def engine_of_config(path: str) -> tuple[str, int]:
    """(engine, processes) of an accelerate config file."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    kind = cfg.get("distributed_type", "NO")
    gpus = int(cfg.get("num_processes", 1))
    if kind == "FSDP":
        return "fsdp2", gpus
    if kind == "DEEPSPEED":
        return f"zero{cfg.get('deepspeed_config', {}).get('zero_stage', 2)}", gpus
    return "ddp", gpus


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(args) -> int:
    from dlm.config import ConfigError, load_recipe
    from dlm.eval.bench_decode import SHAPES

    cfg = load_recipe(args.recipe, args.overrides or [])
    if args.shape is not None:
        if args.shape not in SHAPES:
            raise ConfigError(f"--shape {args.shape!r}; shapes: {', '.join(SHAPES)}")
        config = SHAPES[args.shape].config()
        where = f"shape {args.shape}"
    elif cfg.model.init_from is not None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(Path(cfg.model.init_from)))
        except (OSError, ValueError):
            raise ConfigError(
                f"model.init_from={cfg.model.init_from!r} is not a local dlm model: name its shape with --shape "
                "(e.g. --shape llada-8b)"
            ) from None
        where = cfg.model.init_from
    else:
        from dlm.model.build import model_config

        config = model_config(cfg.model, cfg.tokenizer.vocab_size + 1)
        where = "the recipe's model"
    sizes = model_sizes(config)
    engines = ENGINES
    gpus = args.gpus
    if args.accelerate_config:
        engine, config_gpus = engine_of_config(args.accelerate_config)
        engines, gpus = (engine,), args.gpus or config_gpus
    gpus = gpus or 8
    rows, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    scored = 1.0 if cfg.objective == "ar" else 0.5
    act = activations(sizes, rows, seq, cfg.model.gradient_checkpointing, scored)
    plans = [plan(e, sizes, gpus, act) for e in engines]
    print(
        f"dlm bench memory | {where}: {count(sizes['params'])} parameters | {gpus} GPUs | micro-batch {rows} x "
        f"{seq} tokens | gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}"
    )
    print(f"{'engine':<7} {'params GB':>10} {'grads GB':>9} {'optim GB':>9} {'activ. GB':>10} {'total GB':>9}  fits")
    for p in plans:
        fits = "yes" if p.total <= args.gpu_memory * GB else "no"
        print(
            f"{p.engine:<7} {p.params / GB:>10.1f} {p.grads / GB:>9.1f} {p.optimizer / GB:>9.1f} "
            f"{p.activations / GB:>10.1f} {p.total / GB:>9.1f}  {fits} ({args.gpu_memory:g} GB)"
        )
    if args.json:
        record = {"where": str(where), "gpus": gpus, "gpu_memory_gb": args.gpu_memory, **sizes,
                  "micro_batch": rows, "seq_len": seq, "gradient_checkpointing": cfg.model.gradient_checkpointing,
                  "plans": [{**p.__dict__, "total": p.total} for p in plans]}  # fmt: skip
        write_json(args.json, record)
    return 0
