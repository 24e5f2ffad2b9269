"""``dlm ppl``: perplexity on a dataset (NELBO bound for diffusion models) or generative
perplexity + unigram entropy of samples under an AR judge. See :mod:`dlm.eval.quality`."""

from __future__ import annotations

from dlm.utils import torch_dtype, write_json


def _load(path: str, device: str, dtype):
    """dlm and converted checkpoints through dlm's loader; any other causal LM (a judge) through transformers."""
    from transformers import AutoModelForCausalLM

    from dlm.loading import load

    model, tok, where = load(path, dtype=dtype, device=device, auto_class=AutoModelForCausalLM)
    return model, tok, str(where)


def main(args) -> int:
    from dlm.config import ConfigError

    if args.judge is None and args.data is None:
        raise ConfigError("give --data (perplexity on a dataset) or --judge (generative perplexity of samples)")
    model, tok, where = _load(args.checkpoint, args.device, torch_dtype(args.dtype))
    record: dict = {"checkpoint": where}
    if args.data is not None:
        record["dataset"] = _dataset_perplexity(args, model, tok, where)
    if args.judge is not None:
        record["generative"] = _generative_perplexity(args, model, tok, where)
    if args.output:
        write_json(args.output, record)
    return 0


def _dataset_perplexity(args, model, tok, where: str) -> dict:
    """The perplexity (bound, for a diffusion model) of ``--data`` in rows of ``--seq-len`` tokens."""
    from dlm.config import ConfigError
    from dlm.data import DataConfig, load_documents, pack, tokenize_texts
    from dlm.eval.quality import dataset_perplexity

    cfg = DataConfig(dataset=args.data, file_glob=args.file_glob, max_documents=args.max_documents)
    docs = load_documents(cfg)
    if args.max_documents is not None:
        docs = docs.shuffle(seed=args.seed).select(range(min(args.max_documents, len(docs))))
    rows = pack(tokenize_texts(tok, docs[cfg.text_field], "tokenising"), args.seq_len, tok.eos_token_id)
    if args.max_rows:
        rows = rows[: args.max_rows]
    if rows.shape[0] == 0:
        raise ConfigError(f"--data {args.data} gives no rows of {args.seq_len} tokens; lower --seq-len")
    mask_id = getattr(model.config, "mask_token_id", None)
    result = dataset_perplexity(model, rows, mask_id, args.mc_num, args.batch_size, args.seed)
    kind = "perplexity (exact, causal model)" if not result["bound"] else "NELBO perplexity bound (upper bound)"
    se = (
        f" (MC s.e. of nll/token {result['nll_per_token_stderr']:.4f}, mc_num {args.mc_num})" if result["bound"] else ""
    )
    print(
        f"dlm ppl | {where} | {args.data}: {rows.shape[0]} rows x {args.seq_len} tokens | "
        f"{kind}: {result['perplexity']:.3f}{se}"
    )
    return {"data": args.data, "rows": rows.shape[0], "seq_len": args.seq_len, **result}


def _samples(args, model, tok):
    """``--num-samples`` unconditional samples (EDLM under ``--energy`` when given): the decode
    output and the energy model's path (or None)."""
    import torch

    from dlm.config import ConfigError
    from dlm.decode import build_decoder

    steps = {"steps": args.steps or args.gen_length} if args.decoder != "first_hitting" else {}
    decoder = build_decoder(args.decoder, gen_length=args.gen_length, block_length=args.block_length,
                            temperature=args.temperature, **steps)  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.full((args.num_samples, 1), tok.eos_token_id, dtype=torch.long, device=args.device)
    if args.energy is None:
        return decoder(model, prompt, generator=gen), None
    from dlm.decode.guides import build_guide
    from dlm.decode.guides.base import GuideError
    from dlm.decode.guides.edlm import CausalEnergy, check_same_vocabulary

    # EDLM: parallel steps importance-resampled under an AR energy
    energy_model, energy_tok, energy_where = _load(args.energy, args.device, torch_dtype(args.dtype))
    try:
        check_same_vocabulary(tok, energy_tok, energy_where)
        guide = build_guide("edlm", candidates=args.candidates, steps=args.energy_steps)
        energy = CausalEnergy(energy_model.eval(), model.config.mask_token_id)
        return guide(decoder, model, prompt, energy=energy, generator=gen), energy_where
    except (GuideError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _generative_perplexity(args, model, tok, where: str) -> dict:
    """Samples of the diffusion model scored by an AR judge, and their unigram entropy."""
    from dlm.config import ConfigError
    from dlm.decode.stopping import until_eos
    from dlm.eval.quality import generative_perplexity, is_causal, unigram_entropy

    if is_causal(model):
        raise ConfigError(f"{where} is an AR model; generative perplexity is for samples of a diffusion model")
    judge, judge_tok, judge_where = _load(args.judge, args.device, torch_dtype(args.dtype))
    if judge.config.model_type == "dlm" and not is_causal(judge):
        raise ConfigError(
            f"--judge {judge_where} is a masked-diffusion model ({judge.config.attention_mode} attention); "
            "generative perplexity needs an AR judge: a dlm AR run (objective=ar) or a causal LM"
        )
    out, energy_where = _samples(args, model, tok)
    samples = [until_eos(row, tok.eos_token_id) for row in out.generated.tolist()]
    gppl = generative_perplexity(judge, judge_tok, tok.batch_decode(samples, skip_special_tokens=True), args.batch_size)
    entropy = unigram_entropy(samples)
    decode_nfe = float(getattr(out, "decode_nfe", out.nfe).double().mean())
    edlm = None
    if energy_where is not None:
        edlm = {"energy": energy_where, "candidates": args.candidates, "steps": args.energy_steps,
                "energy_nfe": float(out.energy_nfe.double().mean())}  # fmt: skip
    extra = (
        f" + {edlm['energy_nfe']:.0f} energy evaluations, EDLM k={args.candidates} energy {energy_where}"
        if edlm
        else ""
    )
    print(
        f"dlm ppl | {args.num_samples} samples of {args.gen_length} tokens ({args.decoder}, temperature "
        f"{args.temperature}, NFE {decode_nfe:.1f}{extra}) | generative perplexity under "
        f"{judge_where}: {gppl:.3f} | unigram entropy: {entropy:.3f} nats"
    )
    return {
        "judge": judge_where, "decoder": args.decoder, "temperature": args.temperature,
        "num_samples": args.num_samples, "gen_length": args.gen_length, "generative_perplexity": gppl,
        "unigram_entropy": entropy, "nfe": decode_nfe, "edlm": edlm,
    }  # fmt: skip
