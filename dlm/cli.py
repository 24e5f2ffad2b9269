"""The ``dlm`` command line.

dlm train RECIPE.yaml [key=value ...]        train (one process; use accelerate launch for more)
dlm generate CHECKPOINT --prompt TEXT ...    sample from a trained model
dlm bench train [--hidden-size ...]          training step time, MDLM vs AR on one backbone
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from dlm.config import load_recipe
    from dlm.train.loop import main as train_main

    cfg = load_recipe(args.recipe, args.overrides)
    train_main(cfg)
    return 0


def resolve_checkpoint(path: str) -> Path:
    """A model directory: the path itself, or ``<run>/final`` / its newest checkpoint."""
    from dlm.train.checkpoint import list_checkpoints

    root = Path(path).expanduser()
    if (root / "config.json").is_file():
        return root
    if (root / "final" / "config.json").is_file():
        return root / "final"
    found = list_checkpoints(root)
    if found:
        return found[-1]
    raise FileNotFoundError(
        f"no dlm model at {path!r}: expected a directory with config.json, or a training "
        "output_dir with final/ or checkpoint-<step>/ inside"
    )


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import dlm  # noqa: F401  (registers the Auto classes)
    from dlm.decode.ancestral import AncestralDecoder

    ckpt = resolve_checkpoint(args.checkpoint)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModel.from_pretrained(ckpt).to(args.device).eval()
    prompts = list(args.prompt or [""])
    if args.prompt_file:
        prompts = [line.rstrip("\n") for line in open(args.prompt_file) if line.strip()]
    prompts = [p for p in prompts for _ in range(args.num_samples)]
    tok.padding_side = "left"
    enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    decoder = AncestralDecoder(gen_length=args.gen_length, steps=args.steps, temperature=args.temperature)
    gen = torch.Generator().manual_seed(args.seed)
    out = decoder(
        model, enc["input_ids"].to(args.device), attention_mask=enc["attention_mask"].to(args.device), generator=gen
    )
    for prompt, ids, nfe in zip(prompts, out.generated, out.nfe):
        print(f"=== {prompt!r} (NFE {int(nfe)})\n{prompt}{tok.decode(ids, skip_special_tokens=False)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dlm.eval.bench_train import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Discrete / masked diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train from a YAML recipe",
        description="Train from a YAML recipe with "
        "dotted overrides, e.g. dlm train recipes/quickstart.yaml train.max_steps=100 optim.lr=1e-3",
    )
    p.add_argument("recipe", help="recipe YAML path, or a bundled recipe name (quickstart)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="sample from a trained model")
    p.add_argument("checkpoint", help="model directory, or a training output_dir")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable); empty = unconditional")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_generate)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("train", help="training step time: MDLM ÷ AR on the same backbone and batch")
    b.add_argument("--hidden-size", type=int, default=512)
    b.add_argument("--layers", type=int, default=8)
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--vocab-size", type=int, default=32768)
    b.add_argument("--seq-len", type=int, default=256)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--steps", type=int, default=10, help="timed steps per objective (after warm-up)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--objectives", default="mdlm,exact_count,ar")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--device", default="cuda" if _cuda() else "cpu")
    b.add_argument("--json", help="write the results here as JSON")
    b.set_defaults(func=_bench)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def main(argv: list[str] | None = None) -> int:
    from dlm.config import ConfigError
    from dlm.data import DataError
    from dlm.tokenizer import TokenizerError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, TokenizerError, FileNotFoundError) as exc:
        print(f"dlm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
