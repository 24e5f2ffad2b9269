"""The ``dlm`` command line.

dlm train RECIPE.yaml [key=value ...]        train (one process; use accelerate launch for more)
dlm generate CHECKPOINT --prompt TEXT ...    sample from a trained model
dlm rl RECIPE.yaml [key=value ...]           RL fine-tuning (rewards from generated tasks)
dlm rl-compare RUN [RUN ...] [--out PNG]     held-out reward of RL runs, seeds grouped: table + plot
dlm eval CHECKPOINT --tasks ...              lm-eval-harness tasks, scores + decoding throughput
dlm ppl CHECKPOINT --data ... | --judge ...  perplexity bound on data; generative ppl + entropy
dlm bench train [--hidden-size ...]          training step time, MDLM vs AR on one backbone
dlm bench decode [--checkpoint PATH] ...     decoding throughput: decoders x caches x lengths x batch
dlm tune CHECKPOINT --task T ...             sweep decoding settings: Pareto front, the fastest within a tolerance
dlm convert SOURCE OUTPUT [--family ...]     LLaDA / Dream / SDAR / Llama / Qwen checkpoint -> dlm checkpoint
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> int:
    from dlm.config import load_recipe
    from dlm.train.loop import main as train_main

    cfg = load_recipe(args.recipe, args.overrides)
    train_main(cfg)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dlm.model.convert import convert

    out = convert(
        args.source,
        args.output,
        family=args.family,
        dtype=args.dtype,
        block_size=args.block_size,
        mask_token_id=args.mask_token_id,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        trust_remote_code=args.trust_remote_code,
    )
    print(f"wrote {out}")
    return 0


DECODER_OPTIONS = (  # CLI options that are decoder settings of the same name (None = not given)
    "gen_length",
    "steps",
    "block_length",
    "temperature",
    "top_k",
    "top_p",
    "cfg_scale",
    "remasking",
    "threshold",
    "factor",
    "tokens_per_call",
    "cache",
    "refresh_every",
    "open_next_at",
    "max_open_blocks",
    "compile",
)


def options_for(args: argparse.Namespace, registry, name: str, options, flag: str) -> dict:
    """The settings of ``registry[name]`` given on the command line (``options``: CLI option ->
    setting, or CLI options named as their settings); an option the component does not take is an
    error naming ``--flag NAME``."""
    from dataclasses import fields

    from dlm.config import ConfigError

    allowed = {f.name for f in fields(registry.get(name))}
    settings = {}
    pairs = options.items() if isinstance(options, dict) else ((option, option) for option in options)
    for option, key in pairs:
        value = getattr(args, option, None)
        if value is None:
            continue
        if key not in allowed:
            raise ConfigError(f"--{option.replace('_', '-')} does not apply to --{flag} {name}")
        settings[key] = value
    return settings


def decoder_settings(args: argparse.Namespace) -> dict:
    """Settings for ``build_decoder`` from the CLI; an option the decoder does not take is an error.
    Only options given are returned (a preset or the decoder's defaults fill the rest)."""
    from dlm.decode import DECODERS

    settings = options_for(args, DECODERS, args.decoder, DECODER_OPTIONS, "decoder")
    if args.decoder == "confidence":
        settings.update(confidence_rule(args))
    return settings


def confidence_rule(args: argparse.Namespace) -> dict:
    """``{"rule": "threshold" | "factor"}`` when ``--threshold`` or ``--factor`` is given (both is
    an error), else nothing: the decoder's own rule."""
    from dlm.config import ConfigError

    if args.threshold is not None and args.factor is not None:
        raise ConfigError("give --threshold or --factor, not both")
    if args.threshold is None and args.factor is None:
        return {}
    return {"rule": "threshold" if args.threshold is not None else "factor"}


def add_speed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--open-next-at",
        type=float,
        default=None,
        help="pipelined blocks (confidence decoder, --threshold or --factor): open the next block once this "
        "fraction of the newest open block is decoded (default 1 = block by block)",
    )
    p.add_argument(
        "--max-open-blocks", type=int, default=None, help="pipelined blocks: at most this many open (default 2)"
    )
    p.add_argument(
        "--compile",
        action="store_const",
        const=True,
        default=None,
        help="run the model's forward under torch.compile (CUDA graphs on GPU); the first decode compiles "
        "(default off)",
    )


GUIDE_OPTIONS = {  # CLI option -> guide setting
    "particles": "particles",
    "candidates": "candidates",
    "alpha": "alpha",
    "rollouts": "rollouts",
    "dts_mode": "mode",
    "energy_steps": "steps",
}


def guide_settings(args: argparse.Namespace) -> dict:
    """Settings for ``build_guide`` from the CLI; an option the guide does not take is an error."""
    from dlm.decode.guides import GUIDES

    return options_for(args, GUIDES, args.guide, GUIDE_OPTIONS, "guide")


def _guided(args, decoder, model, tok, enc, prompts, gen, dtype):
    """Run ``--guide`` over the prompts; returns the GuidedOutput."""
    from dlm.config import ConfigError
    from dlm.decode.guides import build_guide
    from dlm.decode.guides.base import GuideError, as_reward

    try:
        guide = build_guide(args.guide, **guide_settings(args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.energy is not None and args.guide != "edlm":
        raise ConfigError("--energy applies to --guide edlm only")
    kwargs = {"attention_mask": enc["attention_mask"].to(args.device), "generator": gen}
    try:
        reward = as_reward(args.reward, tok, prompts) if args.reward else None
        if args.guide == "edlm":
            if args.energy is None:
                raise ConfigError("--guide edlm needs --energy CHECKPOINT (a causal LM with the same tokenizer)")
            from dlm.decode.guides.edlm import CausalEnergy, check_same_vocabulary
            from dlm.loading import load

            energy_model, energy_tok, where = load(args.energy, dtype=dtype, device=args.device)
            check_same_vocabulary(tok, energy_tok, str(where))
            energy = CausalEnergy(energy_model.eval(), model.config.mask_token_id)
            return guide(decoder, model, enc["input_ids"].to(args.device), energy=energy, reward=reward, **kwargs)
        if reward is None:
            raise ConfigError(
                f"--guide {args.guide} needs --reward NAME (a reward of dlm.train.rl.rewards or module:function)"
            )
        return guide(decoder, model, enc["input_ids"].to(args.device), reward=reward, **kwargs)
    except (GuideError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _generate(args: argparse.Namespace) -> int:
    import torch

    from dlm.config import ConfigError
    from dlm.decode import build_decoder
    from dlm.decode.show import render_frames, replay
    from dlm.decode.stopping import StopStrings, cut_at_stop
    from dlm.loading import load
    from dlm.utils import torch_dtype

    dtype = torch_dtype(args.dtype)
    model, tok, ckpt = load(args.checkpoint, dtype=dtype, device=args.device)
    prompts = list(args.prompt or [""])
    if args.prompt_file:
        prompts = [line.rstrip("\n") for line in open(args.prompt_file) if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompt-file {args.prompt_file} has no prompts (one per line)")
    texts = prompts
    if args.chat:
        if not tok.chat_template:
            raise ConfigError(f"the tokenizer at {ckpt} has no chat template; drop --chat")
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    texts = [t for t in texts for _ in range(args.num_samples)]
    prompts = [p for p in prompts for _ in range(args.num_samples)]
    tok.padding_side = "left"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    from dlm.decode.presets import apply_preset

    settings = apply_preset({"preset": args.preset, **({"decoder": args.decoder} if args.decoder else {})})
    args.decoder = settings.pop("decoder", "confidence")
    settings.update(decoder_settings(args))  # options given win over the preset
    settings.setdefault("gen_length", 128)
    settings.setdefault("steps", settings["gen_length"])
    try:
        decoder = build_decoder(
            args.decoder, record_history=args.show, stop=StopStrings(tok, args.stop) if args.stop else None, **settings
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    gen = torch.Generator().manual_seed(args.seed)
    if args.guide is not None:
        if args.show:
            raise ConfigError("--show replays one decoding; it does not combine with --guide")
        out = _guided(args, decoder, model, tok, enc, prompts, gen, dtype)
        for prompt, ids, nfe, reward in zip(prompts, out.generated, out.nfe, out.reward):
            text = tok.decode(ids, skip_special_tokens=True)
            if args.stop:
                text = cut_at_stop(text, args.stop)
            print(f"=== {prompt!r} ({args.guide}: reward {float(reward):.4g}, NFE {int(nfe)})\n{prompt}{text}")
        return 0
    try:  # checks that need the model (cache support, context length, mask id) raise here
        out = decoder(
            model, enc["input_ids"].to(args.device), attention_mask=enc["attention_mask"].to(args.device), generator=gen
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if args.show and out.history:
        frames = render_frames(
            out.history, tok, out.prompt_length, model.config.mask_token_id, color=sys.stdout.isatty()
        )
        replay(frames, texts[0])
    for prompt, ids, nfe in zip(prompts, out.generated, out.nfe):
        text = tok.decode(ids, skip_special_tokens=True)
        if args.stop:
            text = cut_at_stop(text, args.stop)
        print(f"=== {prompt!r} (NFE {int(nfe)})\n{prompt}{text}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        from dlm.eval.run import main as eval_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("lm_eval"):
            from dlm.config import ConfigError

            raise ConfigError('dlm eval needs lm-eval: pip install "dlm[eval]" (or pip install lm-eval)') from None
        raise
    return eval_main(args)


def _rl(args: argparse.Namespace) -> int:
    from dlm.config import load_recipe
    from dlm.train.rl.loop import RLRecipe
    from dlm.train.rl.loop import main as rl_main

    rl_main(load_recipe(args.recipe, args.overrides, cls=RLRecipe))
    return 0


def _rl_compare(args: argparse.Namespace) -> int:
    from dlm.train.rl.compare import main as compare_main

    print(compare_main(args.runs, args.out))
    if args.out:
        print(f"plot: {args.out}")
    return 0


def _ppl(args: argparse.Namespace) -> int:
    from dlm.eval.ppl import main as ppl_main

    return ppl_main(args)


def _bench_train(args: argparse.Namespace) -> int:
    from dlm.eval.bench_train import main as bench_main

    return bench_main(args)


def _bench_memory(args: argparse.Namespace) -> int:
    from dlm.eval.bench_memory import main as bench_main

    return bench_main(args)


def _tune(args: argparse.Namespace) -> int:
    from dlm.eval.tune import main as tune_main

    return tune_main(args)


def _bench_guide(args: argparse.Namespace) -> int:
    from dlm.eval.bench_guide import main as bench_main

    return bench_main(args)


def _bench_decode(args: argparse.Namespace) -> int:
    from dlm.eval.bench_decode import main as bench_main

    return bench_main(args)


def add_guide_options(p: argparse.ArgumentParser) -> None:
    from dlm.decode.guides import guide_names

    g = p.add_argument_group("guided decoding", "raise a reward at decoding time (docs/guided-decoding.md)")
    g.add_argument("--guide", default=None, choices=guide_names(), help="default: none (plain decoding)")
    g.add_argument(
        "--reward",
        default=None,
        help="reward name (answer_tags, boxed, a reasoning-gym dataset, ...) or module:function",
    )
    g.add_argument(
        "--particles", type=int, default=None, help="best_of_n / smc / svdd: samples or particles per prompt"
    )
    g.add_argument(
        "--candidates", type=int, default=None, help="svdd: candidate steps per particle; edlm: candidates per step"
    )
    g.add_argument("--alpha", type=float, default=None, help="smc / svdd / dts: temperature of the tilt exp(r/alpha)")
    g.add_argument("--rollouts", type=int, default=None, help="dts: rollouts per prompt")
    g.add_argument(
        "--dts-mode", default=None, choices=["sample", "search"], help="dts: sample the tilt or search the best"
    )
    g.add_argument(
        "--energy", default=None, help="edlm: causal LM checkpoint (same tokenizer) whose log-likelihood is the energy"
    )
    g.add_argument(
        "--energy-steps", type=int, default=None, help="edlm: resample in the first n steps of each block only"
    )


class _DefaultsShown(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def _command(sub, name: str, func, help: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=kwargs.pop("description", help), formatter_class=_DefaultsShown)
    p.set_defaults(func=func)
    return p


def add_run_options(
    p: argparse.ArgumentParser, *, seed: int = 0, device: str | None = None, dtypes=None, device_help="cpu, cuda, ..."
) -> None:
    """``--seed``, ``--device`` and ``--dtype``, shared by every command that runs a model."""
    p.add_argument("--seed", type=int, default=seed, help="random seed")
    p.add_argument("--device", default=device, help=device_help + ("" if device else " (default: cuda if available)"))
    dtypes = dtypes or ["float32", "bfloat16"]
    p.add_argument("--dtype", default=dtypes[0], choices=dtypes, help="weights and activations")


def _add_recipe_command(sub, name: str, func, help: str, example: str) -> None:
    p = _command(sub, name, func, help, description=f"{help}, with dotted overrides, e.g. {example}")
    p.add_argument("recipe", help=f"recipe YAML path, or a bundled recipe name ({example.split()[2]})")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides (dotted keys); values that are not YAML are strings"
    )


def _add_decoding_options(p: argparse.ArgumentParser, decoders: list[str], caches: tuple[str, ...]) -> None:
    """The decoder and its settings, as ``dlm generate`` and ``dlm eval`` take them; a setting not
    given comes from ``--preset``, else the decoder's default."""
    p.add_argument("--decoder", default=None, choices=decoders, help="default: the preset's, else confidence")
    p.add_argument("--preset", default=None, help="decode preset YAML (dlm tune writes one); options given win")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the generation length)")
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: the whole gen)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1; dlm eval: the task's)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="confidence decoder: Fast-dLLM threshold rule (default: gen/steps tokens per step)",
    )
    p.add_argument("--factor", type=float, default=None, help="confidence decoder: Fast-dLLM factor rule (default off)")
    p.add_argument(
        "--cache",
        choices=caches,
        default=None,
        help="KV cache (default none): exact (lossless, block-causal models), prefix / dual (Fast-dLLM), "
        "delayed (dKV-Cache)",
    )
    p.add_argument(
        "--refresh-every", type=int, default=None, help="delayed cache: full refresh every r calls (default 8)"
    )
    add_speed_options(p)


def comma_names(registry):
    """An argparse type: a comma list of names the registry knows (returned as given); an unknown
    one is a usage error listing the known names and the closest."""
    from dlm.registry import close_matches

    def check(text: str) -> str:
        for name in (n for n in text.split(",") if n):
            if name not in registry:
                known = registry.names()
                raise argparse.ArgumentTypeError(
                    f"unknown {registry.kind} {name!r}; known: {', '.join(known)}." + close_matches(name, known)
                )
        return text

    return check


def _add_train(sub) -> None:
    _add_recipe_command(
        sub, "train", _train, "train from a YAML recipe", "dlm train quickstart train.max_steps=100 optim.lr=1e-3"
    )


def _add_generate(sub, decoders: list[str], caches: tuple[str, ...]) -> None:
    p = _command(sub, "generate", _generate, "sample from a trained model")
    p.add_argument("checkpoint", help="model directory, a training output_dir, or a hub id")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; default: one unconditional sample)")
    p.add_argument("--prompt-file", help="one prompt per line, decoded as one batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--gen-length", type=int, default=None, help="tokens to generate (default 128, or the preset's)")
    _add_decoding_options(p, decoders, caches)
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1: all)")
    p.add_argument(
        "--remasking",
        choices=["confidence", "margin", "entropy", "random"],
        default=None,
        help="confidence decoder: how candidates are scored (default confidence)",
    )
    p.add_argument("--tokens-per-call", type=int, default=None, help="first_hitting: tokens per model call (default 1)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default 0: off)")
    p.add_argument("--stop", action="append", help="stop string (repeatable; default none)")
    p.add_argument("--show", action="store_true", help="replay the unmasking step by step in the terminal")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    add_run_options(p, device="cpu")
    add_guide_options(p)


def _add_tune(sub) -> None:
    floats = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    p = _command(sub, "tune", _tune, "sweep decoding settings on a task: Pareto PNG, AUP and a decode preset")
    p.add_argument("checkpoint", help="model directory, a training output_dir, or a hub id")
    p.add_argument("--task", required=True, help="a generated task (dlm.tasks), e.g. repeat")
    p.add_argument("--task-args", default=None, help="task arguments, e.g. repeats=64 (default: the task's)")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts decoded per setting")
    p.add_argument("--gen-length", type=int, default=None, help="default: the longest answer's token count")
    p.add_argument("--thresholds", type=floats, default=[0.7, 0.8, 0.9], help="threshold rule values, comma list")
    p.add_argument("--factors", type=floats, default=[], help="factor rule values, comma list (default none)")
    p.add_argument("--block-lengths", type=ints, default=[32], help="comma list")
    p.add_argument("--caches", type=lambda t: t.split(","), default=["none", "dual"], help="comma list")
    p.add_argument("--open-next-at", type=floats, default=[1.0, 0.0], help="pipelining fractions, comma list")
    p.add_argument("--max-open-blocks", type=int, default=8, help="open blocks when pipelining")
    p.add_argument("--tolerance", type=float, default=0.01, help="score the choice may lose")
    p.add_argument("--out", required=True, help="directory for tune.json, pareto.png and preset.yaml")
    add_run_options(p)


def _add_rl(sub) -> None:
    _add_recipe_command(
        sub,
        "rl",
        _rl,
        "RL fine-tuning from a recipe (trajectory PG, diffu-GRPO, coupled-GRPO)",
        "dlm rl rl-quickstart rl.steps=50",
    )
    p = _command(sub, "rl-compare", _rl_compare, "held-out reward of RL runs (seeds grouped by -seedN): table + PNG")
    p.add_argument("runs", nargs="+", help="dlm rl output directories (NAME-seedN groups seeds of one setting)")
    p.add_argument("--out", default=None, help="write the combined curve to this PNG (default: table only)")


def _add_eval(sub, decoders: list[str], caches: tuple[str, ...]) -> None:
    p = _command(sub, "eval", _eval, "lm-eval-harness tasks on a checkpoint (scores + decoding throughput)")
    p.add_argument("checkpoint", help="model directory, a training output_dir, or a hub id")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma list: dlm_repeat, dlm_repeat_mc, dlm_arithmetic, dlm_stdlib_ppl (offline) or any lm-eval task",
    )
    p.add_argument("--include-path", action="append", help="directory of extra task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, default=None, help="examples per task, or a fraction (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--log-samples", action="store_true", help="keep every sample in --output")
    p.add_argument("--output", help="write scores, throughput and settings here as JSON")
    p.add_argument("--gen-length", type=int, default=None, help="generation length when a task sets none (default 256)")
    _add_decoding_options(p, decoders, caches)
    p.add_argument("--mc-num", type=int, default=None, help="Monte-Carlo samples per loglikelihood (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward (default 8)")
    add_run_options(p, seed=1234, dtypes=["float32", "bfloat16", "float16"])


def _add_ppl(sub, decoders: list[str]) -> None:
    p = _command(sub, "ppl", _ppl, "perplexity (NELBO bound) on a dataset, or generative perplexity of samples")
    p.add_argument("checkpoint", help="model directory, a training output_dir, or a hub id")
    p.add_argument("--data", default=None, help="stdlib, a local file or directory, or a hub dataset")
    p.add_argument("--file-glob", default="**/*.py", help="files of a local directory (or of stdlib)")
    p.add_argument("--max-documents", type=int, default=None, help="read at most this many documents (default: all)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per scored row")
    p.add_argument("--max-rows", type=int, default=None, help="score at most this many rows (default: all)")
    p.add_argument("--mc-num", type=int, default=32, help="Monte-Carlo samples per row (diffusion models)")
    p.add_argument("--batch-size", type=int, default=16, help="rows (or samples) per forward")
    g = p.add_argument_group("generative perplexity", "sample, then score the samples with an AR judge")
    g.add_argument("--judge", default=None, help="AR judge: a dlm AR checkpoint or an HF causal LM (default: none)")
    g.add_argument("--num-samples", type=int, default=16, help="samples to score")
    g.add_argument("--gen-length", type=int, default=128, help="tokens per sample")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the generation length)")
    g.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: the whole gen)")
    g.add_argument("--decoder", default="first_hitting", choices=decoders, help="sampler of the scored samples")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")

    g.add_argument(
        "--energy", default=None, help="decode the samples with EDLM, this causal LM's log-likelihood as the energy"
    )
    g.add_argument("--candidates", type=int, default=8, help="EDLM candidates per parallel step")
    g.add_argument("--energy-steps", type=int, default=None, help="EDLM in the first n steps of each block only")
    p.add_argument("--output", help="write the figures here as JSON")
    add_run_options(p, device="cpu")


def _add_bench_train(bench) -> None:
    b = _command(bench, "train", _bench_train, "training step time: MDLM ÷ AR on the same backbone and batch")
    b.add_argument("--hidden-size", type=int, default=512, help="backbone width")
    b.add_argument("--layers", type=int, default=8, help="transformer layers")
    b.add_argument("--heads", type=int, default=8, help="attention heads")
    b.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    b.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    b.add_argument("--batch-size", type=int, default=8, help="rows per step")
    b.add_argument("--steps", type=int, default=10, help="timed steps per objective (after warm-up)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    from dlm.train.objectives import OBJECTIVES

    b.add_argument(
        "--objectives",
        default="mdlm,exact_count,bd3lm,ar",
        type=comma_names(OBJECTIVES),
        help=f"comma list of {', '.join(OBJECTIVES.names())}",
    )
    b.add_argument("--block-size", type=int, default=16, help="BD3-LM block size")
    b.add_argument("--json", help="write the results here as JSON")
    add_run_options(b)


def _add_bench_decode(bench, decoders: list[str]) -> None:
    b = _command(
        bench, "decode", _bench_decode, "decoders x caches x lengths x batch sizes: tokens/s, NFE, latency, memory"
    )
    b.add_argument("--checkpoint", default=None, help="a trained model (default: random weights of --shape)")
    b.add_argument(
        "--shape",
        default=None,
        help="benchmark shape: tiny, small (11.6M), tiny-126k (LLaDA's vocabulary), base (42.5M), llada-8b "
        "(default: the --hidden-size/--layers/--heads/--vocab-size shape)",
    )
    b.add_argument("--hidden-size", type=int, default=256, help="custom shape (when no --shape/--checkpoint)")
    b.add_argument("--layers", type=int, default=4, help="custom shape: layers")
    b.add_argument("--heads", type=int, default=4, help="custom shape: attention heads")
    b.add_argument("--vocab-size", type=int, default=32768, help="custom shape: vocabulary size")
    b.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,8")
    b.add_argument("--prompt-length", type=int, default=16, help="random prompts (without --task)")
    b.add_argument("--gen-lengths", default="256,1024", help="comma list")
    b.add_argument("--steps", type=int, default=None, help="default: the generation length (one token per step)")
    b.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block")
    b.add_argument(
        "--decoders",
        default=None,
        help=f"comma list of {', '.join(decoders)}, threshold, pipelined "
        "(threshold with pipelined blocks; default: all but pipelined)",
    )
    b.add_argument("--threshold", type=float, default=0.9, help="the threshold decoder's confidence threshold")
    b.add_argument("--caches", default=None, help="comma list (default: every cache the model supports)")
    b.add_argument("--refresh-every", type=int, default=8, help="delayed cache refresh interval")
    b.add_argument("--open-next-at", type=float, default=0.5, help="the pipelined decoder's block-opening fraction")
    b.add_argument("--max-open-blocks", type=int, default=2, help="the pipelined decoder's open blocks")
    b.add_argument(
        "--compile",
        default="off",
        choices=["off", "on", "both"],
        help="decode with the compiled forward: on, or both (uncompiled and compiled side by side)",
    )
    b.add_argument("--task", default=None, help="score generations on a generated task, e.g. repeat (default: none)")
    b.add_argument("--task-args", default=None, help="task arguments, e.g. repeats=64 (an answer of 64 x 16 tokens)")
    b.add_argument(
        "--model-block",
        type=int,
        default=None,
        help="make the random model block-causal with this block size (BD3-LM decoding; needed for exact; "
        "default: bidirectional)",
    )
    b.add_argument("--json", help="write every figure here as JSON")
    add_run_options(b, device_help="cpu, cuda, or meta (build --shape on the meta device: weight and KV-cache memory)")


def _add_bench_memory(bench) -> None:
    b = _command(bench, "memory", _bench_memory, "per-GPU memory of a recipe under DDP, FSDP2, ZeRO-2 and ZeRO-3")
    b.add_argument("recipe", help="recipe YAML path, or a bundled recipe name")
    b.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    b.add_argument("--accelerate-config", default=None, help="plan only this config's engine and GPUs (default: all)")
    b.add_argument("--gpus", type=int, default=None, help="GPUs (default: the accelerate config's, else 8)")
    b.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU to check the plan against")
    b.add_argument(
        "--shape",
        default=None,
        help="a benchmark shape (llada-8b, dream-7b, sdar-8b, ...) for hub starts (default: none)",
    )
    b.add_argument("--json", help="write the plan here")


def _add_bench_guide(bench, decoders: list[str]) -> None:
    b = _command(
        bench, "guide", _bench_guide, "guided decoding: reward vs NFE of best-of-N, SMC, SVDD and DTS on a task"
    )
    b.add_argument(
        "--checkpoint", required=True, help="the model to guide (a dlm run, model directory or converted checkpoint)"
    )
    b.add_argument("--task", default="repeat", help="generated task the prompts come from (dlm.tasks or reasoning-gym)")
    b.add_argument("--task-args", default=None, help="task arguments, e.g. period=8,repeats=4 (default: the task's)")
    b.add_argument("--reward", default=None, help="reward name (default: the task's own)")
    b.add_argument("--prompts", type=int, default=32, help="held-out task prompts")
    b.add_argument("--methods", default="best_of_n,smc,svdd,dts", help="comma list (best_of_n is always run)")
    b.add_argument("--budgets", default="1,2,4,8", help="particles (best_of_n, smc), candidates (svdd), rollouts (dts)")
    b.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    b.add_argument("--alpha", type=float, default=0.1, help="smc / dts temperature of the tilt")
    b.add_argument("--svdd-alpha", type=float, default=0.0, help="svdd selection temperature (0: the best)")
    b.add_argument("--dts-mode", default=None, choices=["sample", "search"], help="dts mode (default sample)")
    b.add_argument("--decoder", default="confidence", choices=decoders, help="the decoder every method drives")
    b.add_argument("--gen-length", type=int, default=32, help="tokens per completion")
    b.add_argument("--steps", type=int, default=None, help="default: the generation length")
    b.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: the whole gen)")
    b.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the decoder")
    b.add_argument(
        "--reference",
        default=None,
        help="another checkpoint decoded plainly for comparison, e.g. dlm rl's (default: none)",
    )
    b.add_argument("--json", help="write every figure here")
    b.add_argument("--plot", help="write the reward-vs-NFE curve here (PNG)")
    add_run_options(b)


def _add_convert(sub) -> None:
    p = _command(
        sub, "convert", _convert, "a published checkpoint (LLaDA, Dream, SDAR, Llama, Qwen2/3) as a dlm checkpoint"
    )
    p.add_argument("source", help="a checkpoint directory or a hub id (org/name)")
    p.add_argument("output", help="the new dlm checkpoint directory (must not exist or be empty)")
    p.add_argument("--family", default=None, help="llada, dream, sdar, llama, qwen2, qwen3 (default: from config.json)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the source's)")
    p.add_argument("--block-size", type=int, default=None, help="SDAR block size (default: the config's, else 4)")
    p.add_argument(
        "--mask-token-id",
        type=int,
        default=None,
        help="reuse this token as the mask (default: the config's / tokenizer's, else a new <|mask|>)",
    )
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="size of each output safetensors shard in GB")
    p.add_argument("--trust-remote-code", action="store_true", help="load the source tokenizer's own code")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Building it imports neither torch nor transformers (the registries
    know their built-in names), so ``dlm --help`` answers at once."""
    from dlm import __version__
    from dlm.decode import CACHES, decoder_names

    decoders = decoder_names()
    parser = argparse.ArgumentParser(prog="dlm", description="Discrete / masked diffusion language models.")
    parser.add_argument("--version", action="version", version=f"dlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_generate(sub, decoders, CACHES)
    _add_tune(sub)
    _add_rl(sub)
    _add_eval(sub, decoders, CACHES)
    _add_ppl(sub, decoders)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _add_bench_train(bench)
    _add_bench_decode(bench, decoders)
    _add_bench_memory(bench)
    _add_bench_guide(bench, decoders)
    _add_convert(sub)
    return parser


def _default_device(args: argparse.Namespace) -> None:
    """``--device`` not given: cuda where there is one, else cpu (resolved after parsing, so that
    ``--help`` never imports torch)."""
    if getattr(args, "device", "unset") is None and args.func in _DEVICE_DEFAULTED:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


_DEVICE_DEFAULTED = (_tune, _bench_train, _bench_decode, _bench_guide)


def quiet_libraries() -> None:
    """Keep a one-line command one line: the libraries' info logs, transformers' per-load
    "Loading weights" bar and lm-eval's warnings stay out of dlm's output (dlm's own progress
    bars remain)."""
    for noisy in ("httpx", "datasets", "transformers", "accelerate", "lm_eval", "lm-eval", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR if noisy.startswith("lm") else logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dlm.config import ConfigError
    from dlm.data import DataError
    from dlm.model.convert import ConvertError
    from dlm.tokenizer import TokenizerError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        _default_device(args)
        return args.func(args)
    except (ConfigError, ConvertError, DataError, TokenizerError, FileNotFoundError) as exc:
        print(f"dlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a run that stopped in a known state says so in one line
        from dlm.train.loop import TrainingDivergedError, TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            print(f"dlm {args.command}: {exc}", file=sys.stderr)
            return 130
        if isinstance(exc, TrainingDivergedError):
            print(f"dlm {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
