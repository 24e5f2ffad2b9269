"""lm-eval-harness model ``dlm`` (registered when ``dlm.eval`` is imported), docs/likelihoods.md#lm-eval-loglikelihood.

    lm_eval --model dlm --model_args pretrained=runs/quickstart,decoder=confidence,gen_length=256,\\
        block_length=32,cache=dual,threshold=0.9,mc_num=128,batch_size=8 --tasks ...

* ``loglikelihood``: Monte-Carlo ELBO of the continuation with the context clean
  (:func:`dlm.eval.likelihood.elbo`, stratified exact-count estimator, ``mc_num`` samples); the
  greedy flag decodes the continuation greedily (one token per step) and compares.
* ``loglikelihood_rolling``: the ELBO of the whole text in windows of the model's context
  (lm-eval's rolling windows: every token scored once, each window with as much clean context
  as fits) — a lower bound on the log-likelihood, so the reported perplexities are upper bounds.
* ``generate_until``: batched generation through the decoder registry (greedy unless the task
  sets ``do_sample``; a ``temperature`` in ``model_args`` overrides), cut at the stop
  sequences, ``max_gen_toks`` rounded up to whole blocks.

Under ``accelerate launch -m lm_eval ...`` each process evaluates its share of the requests and
lm-eval gathers the results.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import fields
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from dlm.data import left_pad
from dlm.decode import DECODERS, build_decoder, decoder_names
from dlm.decode.stopping import cut_at_stop, until_eos
from dlm.eval.likelihood import Request, elbo
from dlm.utils import torch_dtype

log = logging.getLogger(__name__)

GENERAL = {
    "pretrained": "model directory or training output_dir (required)",
    "decoder": "decoder name (confidence, ancestral, first_hitting)",
    "preset": "decode preset YAML (dlm tune writes one); other model_args win over its settings",
    "gen_length": "default generation length when a task gives no max_gen_toks",
    "mc_num": "Monte-Carlo samples per loglikelihood request",
    "estimator": "exact_count (stratified, default) or one_over_t",
    "batch_size": "rows per forward pass",
    "max_batch_size": "(accepted for lm-eval compatibility; batch_size is used)",
    "device": "cpu, cuda, cuda:N",
    "dtype": "float32, bfloat16 or float16",
    "max_length": "context window (default: the model's max_position_embeddings)",
    "greedy_check": "compute is_greedy for loglikelihood by greedy decoding (true/false)",
    "seed": "seed of the Monte-Carlo masks and of sampling",
    "trust_remote_code": "load hub checkpoints that ship their own modelling code (e.g. LLaDA)",
    "mask_token_id": "mask token id when the model config has none",
}


def decoder_keys(name: str) -> list[str]:
    return [f.name for f in fields(DECODERS.get(name)) if f.name not in ("stop", "record_history", "gen_length")]


@register_model("dlm")
class DLMEvalModel(TemplateLM):
    def __init__(self, pretrained: str | None = None, **kwargs: Any):
        super().__init__()
        from dlm.decode.presets import apply_preset

        kwargs = apply_preset(kwargs)  # a decode preset (dlm tune); model_args given win
        decoder = str(kwargs.get("decoder", "confidence"))
        if decoder not in decoder_names():
            raise ValueError(f"model_args decoder={decoder!r}; choose one of {', '.join(decoder_names())}")
        valid = list(GENERAL) + decoder_keys(decoder)
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown model_args {', '.join(unknown)} for the dlm model; valid keys: {', '.join(valid)}"
            )
        if pretrained is None:
            raise ValueError("model_args needs pretrained=PATH (a dlm model directory or training output_dir)")
        from dlm.loading import load

        remote = str(kwargs.get("trust_remote_code", False)).lower() in ("true", "1", "yes")
        dtype = torch_dtype(str(kwargs.get("dtype", "float32")))
        self.device_name = str(kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available: running on the CPU", self.device_name)
            self.device_name = "cpu"  # lm-eval's command line asks for cuda by default
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from dlm.train.engine import make_accelerator

            self.accelerator = make_accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            self.device_name = str(self.accelerator.device)
        self.model, self.tokenizer, path = load(
            str(pretrained), dtype=dtype, device=self.device_name, trust_remote_code=remote
        )
        self.path = str(path)
        config = self.model.config
        mask_id = kwargs.get("mask_token_id", getattr(config, "mask_token_id", None))
        if mask_id is None:
            raise ValueError(
                f"the model at {path} has no mask_token_id in its config; pass model_args mask_token_id=ID "
                "(LLaDA: 126336)"
            )
        self.mask_id = int(mask_id)
        self.max_length = int(kwargs.get("max_length") or config.max_position_embeddings)
        self.mc_num = int(kwargs.get("mc_num", 128))
        self.estimator = str(kwargs.get("estimator", "exact_count"))
        self.batch_size = int(kwargs.get("batch_size", 8) if str(kwargs.get("batch_size", 8)) != "auto" else 8)
        self.greedy_check = str(kwargs.get("greedy_check", True)).lower() in ("true", "1", "yes")
        self.seed = int(kwargs.get("seed", 1234))
        self.gen_length = int(kwargs.get("gen_length", 256))
        self.decoder = decoder
        self.decoder_settings = {k: v for k, v in kwargs.items() if k in decoder_keys(decoder)}
        self.warned_truncation = False
        self.generated_tokens = 0
        self.generation_seconds = 0.0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``model_args`` win over lm-eval's own ``--batch_size`` / ``--device`` when both are given."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def device(self) -> torch.device:
        return torch.device(self.device_name)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor.reshape(-1)) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.reshape(-1).contiguous())
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError(f"the tokenizer at {self.path} has no chat template; run without --apply_chat_template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists as a left-padded batch ``(ids, attention_mask)`` on the model's device."""
        ids, pad = left_pad(seqs, self.eot_token_id)
        return ids.to(self.device_name), pad.to(self.device_name)

    def _warn_truncation(self, what: str) -> None:
        if not self.warned_truncation:
            log.warning(
                "%s longer than the model's window of %d tokens: keeping the last tokens of the context "
                "(this warning is shown once)",
                what,
                self.max_length,
            )
            self.warned_truncation = True

    # ------------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        reqs = []
        for _, context, continuation in requests:
            continuation = continuation[-self.max_length :]
            room = self.max_length - len(continuation)
            if len(context) > room:
                self._warn_truncation("a loglikelihood request is")
                context = context[len(context) - room :] if room > 0 else []
            reqs.append(Request(list(context), list(continuation)))
        bar = tqdm(total=len(reqs), desc="dlm loglikelihood", disable=disable_tqdm or self.rank != 0)
        scores = elbo(self.model, reqs, self.mask_id, self.mc_num, self.batch_size, self.estimator, self.seed, bar)
        bar.close()
        greedy = self._greedy_flags(reqs) if self.greedy_check else [False] * len(reqs)
        out = []
        for (cache_key, _, _), (value, _se), g in zip(requests, scores, greedy):
            out.append((value, g))
            self.cache_hook.add_partial("loglikelihood", cache_key, (value, g))
        return out

    @torch.no_grad()
    def _greedy_flags(self, reqs: list[Request]) -> list[bool]:
        """Would greedy decoding (one token per step, most confident first) produce each continuation?
        Requests with equal continuation lengths are decoded together, left-padded."""
        flags = [True] * len(reqs)
        by_length: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            if r.target:
                by_length.setdefault(len(r.target), []).append(i)
        for L, indices in by_length.items():
            decoder = build_decoder("confidence", gen_length=L, steps=L, temperature=0.0, eos_token_id=None)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                ids, pad = self._left_pad([reqs[i].context or [self.eot_token_id] for i in chunk])
                out = decoder(self.model, ids, attention_mask=pad)
                for row, i in enumerate(chunk):
                    flags[i] = out.generated[row].tolist() == reqs[i].target
        return flags

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not getattr(self, "_bound_logged", False):
            log.warning(
                "dlm loglikelihood_rolling returns the diffusion ELBO, a lower bound on the log-likelihood: "
                "perplexities derived from it are upper bounds"
            )
            self._bound_logged = True
        windows: list[Request] = []
        owners: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, target in rolling_windows(self.tok_encode(text), self.eot_token_id, self.max_length):
                windows.append(Request(context, target))
                owners.append(i)
        bar = tqdm(total=len(windows), desc="dlm loglikelihood_rolling", disable=disable_tqdm or self.rank != 0)
        scores = elbo(self.model, windows, self.mask_id, self.mc_num, self.batch_size, self.estimator, self.seed, bar)
        bar.close()
        totals = [0.0] * len(requests)
        for owner, (value, _se) in zip(owners, scores):
            totals[owner] += value
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="dlm generate_until", disable=disable_tqdm or self.rank != 0)
        gen = torch.Generator().manual_seed(self.seed)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self.gen_length))
            settings = dict(self.decoder_settings)
            # lm-eval generates greedily unless a task asks for sampling; model_args override both
            sample = bool(kwargs.pop("do_sample", False))
            task_temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            if "temperature" not in self.decoder_settings:
                settings["temperature"] = task_temperature if sample else 0.0
            block = int(settings.get("block_length") or max_gen)
            length = -(-max_gen // block) * block
            if "steps" in decoder_keys(self.decoder):
                settings["steps"] = length  # one token per step unless a steps-per-token ratio was given
                if "steps" in self.decoder_settings:
                    ratio = int(self.decoder_settings["steps"]) / self.gen_length
                    settings["steps"] = max(length // block, round(ratio * length))
            decoder = build_decoder(self.decoder, gen_length=length, **{**settings, "block_length": block})
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = [requests[i].args[0] for i in chunk]
                encoded = [self.tok_encode(t) or [self.eot_token_id] for t in texts]
                room = self.max_length - length
                if room <= 0:
                    raise ValueError(
                        f"max_gen_toks={max_gen} (rounded to {length}) leaves no room for a prompt in the model's "
                        f"window of {self.max_length}; lower max_gen_toks or gen_length"
                    )
                if any(len(e) > room for e in encoded):
                    self._warn_truncation("a generation prompt plus max_gen_toks is")
                    encoded = [e[-room:] for e in encoded]
                ids, pad = self._left_pad(encoded)
                t0 = time.perf_counter()
                out = decoder(self.model, ids, attention_mask=pad, generator=gen)
                self.generation_seconds += time.perf_counter() - t0
                for row, i in enumerate(chunk):
                    tokens = until_eos(out.generated[row].tolist(), self.eot_token_id)
                    self.generated_tokens += len(tokens)
                    text = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows: ``(context, target)`` pairs, every token a target exactly once,
    each window ``<= max_length`` tokens with as much preceding context as fits (the first
    window's context is the prefix token)."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too small for rolling windows")
    out = []
    seq = [prefix] + tokens
    pos = 0  # tokens[:pos] are scored
    first = True
    while pos < len(tokens):
        if first:
            n = min(max_length - 1, len(tokens))
            out.append(([prefix], tokens[:n]))
            first = False
        else:
            n = min(max_length - 1, len(tokens) - pos)
            window_end = pos + 1 + n  # in seq coordinates, exclusive
            window_start = max(0, window_end - max_length)
            out.append((seq[window_start : pos + 1], tokens[pos : pos + n]))
        pos += n
    return out
