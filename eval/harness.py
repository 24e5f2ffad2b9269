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
from lm_eval.models.utils import Collator
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
    "batch_size": "rows per forward pass, or auto: the largest that fits the GPU, up to max_batch_size (CPU: 8)",
    "max_batch_size": "upper bound of batch_size=auto (default 64)",
    "add_special_tokens": "let the tokenizer add its special tokens (e.g. BOS) to every encoded text (default false)",
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
        self.add_special_tokens = str(kwargs.get("add_special_tokens", False)).lower() in ("true", "1", "yes")
        self.batch_size = self._batch_size(str(kwargs.get("batch_size", 8)), int(kwargs.get("max_batch_size", 64)))
        self.greedy_check = str(kwargs.get("greedy_check", True)).lower() in ("true", "1", "yes")
        self.seed = int(kwargs.get("seed", 1234))
        self.gen_length = int(kwargs.get("gen_length", 256))
        self.decoder = decoder
        self.decoder_settings = {k: v for k, v in kwargs.items() if k in decoder_keys(decoder)}
        self.warned_truncation = False
        self.generated_tokens = 0
        self.generation_seconds = 0.0

    def _batch_size(self, value: str, max_batch: int) -> int:
        """``batch_size`` from model_args: a number, or ``auto`` (``auto:N`` as lm-eval writes it):
        on a GPU the largest batch of full-window rows a forward fits, at most ``max_batch``."""
        if not value.startswith("auto"):
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"model_args batch_size={value!r}: give a positive integer or auto")
            return int(value)
        if max_batch < 1:
            raise ValueError(f"model_args max_batch_size={max_batch} must be >= 1")
        if not self.device_name.startswith("cuda"):
            return min(8, max_batch)  # no memory to probe on the CPU: the fixed default
        return auto_batch_size(self.model, self.max_length, self.mask_id, max_batch)

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

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; special tokens (BOS) only when lm-eval or model_args ask."""
        add = self.add_special_tokens if add_special_tokens is None else bool(add_special_tokens)
        return self.tokenizer(string, add_special_tokens=add)["input_ids"]

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
        scores = self._elbo_longest_first(reqs, bar)
        bar.close()
        greedy = self._greedy_flags(reqs) if self.greedy_check else [False] * len(reqs)
        out = []
        for (cache_key, _, _), (value, _se), g in zip(requests, scores, greedy):
            out.append((value, g))
            self.cache_hook.add_partial("loglikelihood", cache_key, (value, g))
        return out

    def _elbo_longest_first(self, reqs: list[Request], bar) -> list[tuple[float, float]]:
        """``elbo`` of every request, scored longest first (lm-eval's ``Collator``) so rows of a batch
        are of similar length; each request's masks are seeded by its own tokens, so the order
        changes the padding, not the estimates."""
        collator = Collator(reqs, sort_fn=lambda r: -(len(r.context) + len(r.target)))
        ordered = next(collator.get_batched(n=0), [])
        scores = elbo(self.model, ordered, self.mask_id, self.mc_num, self.batch_size, self.estimator, self.seed, bar)
        return collator.get_original(scores)

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
        scores = self._elbo_longest_first(windows, bar)
        bar.close()
        totals = [0.0] * len(requests)
        for owner, (value, _se) in zip(owners, scores):
            totals[owner] += value
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same generation settings, longest prompt first (lm-eval's
        ``Collator``), each decoded, cut at its first EOS and at the task's stop sequences."""
        encoded = [(req.args, self.tok_encode(req.args[0]) or [self.eot_token_id]) for req in requests]
        collator = Collator(
            encoded,
            sort_fn=lambda item: (-len(item[1]), item[0][0]),
            group_fn=lambda item: item[0][1],
            group_by="gen_kwargs",
        )
        bar = tqdm(total=len(requests), desc="dlm generate_until", disable=disable_tqdm or self.rank != 0)
        gen = torch.Generator().manual_seed(self.seed)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            decoder, until, length = self._decoder_for(dict(chunk[0][0][1]))
            ids, pad = self._left_pad(self._fit(length, [prompt for _, prompt in chunk]))
            t0 = time.perf_counter()
            out = decoder(self.model, ids, attention_mask=pad, generator=gen)
            self.generation_seconds += time.perf_counter() - t0
            for row, (args, _) in enumerate(chunk):
                tokens = until_eos(out.generated[row].tolist(), self.eot_token_id)
                self.generated_tokens += len(tokens)
                text = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
                results.append(text)
                self.cache_hook.add_partial("generate_until", args, text)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def _decoder_for(self, kwargs: dict) -> tuple[Any, list[str], int]:
        """The decoder for a task's generation settings, its stop sequences and its length
        (``max_gen_toks`` rounded up to whole blocks). lm-eval generates greedily unless the task
        sets ``do_sample``; a task's ``top_k`` / ``top_p`` are honoured; model_args win over both."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.gen_length))
        settings = dict(self.decoder_settings)
        sample = bool(kwargs.pop("do_sample", False))
        task_temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        settings.setdefault("temperature", task_temperature if sample else 0.0)
        keys = decoder_keys(self.decoder)
        for name in ("top_k", "top_p"):
            value = kwargs.pop(name, None)
            if value is not None and name in keys and name not in self.decoder_settings:
                settings[name] = int(value) if name == "top_k" else float(value)
        if kwargs and not getattr(self, "_warned_kwargs", False):
            log.warning("dlm generate_until ignores these generation settings of the task: %s", ", ".join(kwargs))
            self._warned_kwargs = True
        block = int(settings.get("block_length") or max_gen)
        length = -(-max_gen // block) * block
        if length >= self.max_length:
            raise ValueError(
                f"max_gen_toks={max_gen} (rounded to {length}) leaves no room for a prompt in the model's "
                f"window of {self.max_length}; lower max_gen_toks or gen_length"
            )
        if "steps" in keys:
            settings["steps"] = length  # one token per step unless a steps-per-token ratio was given
            if "steps" in self.decoder_settings:
                ratio = int(self.decoder_settings["steps"]) / self.gen_length
                settings["steps"] = max(length // block, round(ratio * length))
        decoder = build_decoder(self.decoder, gen_length=length, **{**settings, "block_length": block})
        return decoder, until, length

    def _fit(self, length: int, encoded: list[list[int]]) -> list[list[int]]:
        """Encoded prompts, each cut to the window that ``length`` generated tokens leave."""
        room = self.max_length - length
        if any(len(e) > room for e in encoded):
            self._warn_truncation("a generation prompt plus max_gen_toks is")
            encoded = [e[-room:] for e in encoded]
        return encoded


@torch.no_grad()
def auto_batch_size(model, max_length: int, mask_id: int, max_batch: int) -> int:
    """The largest batch of ``max_length``-token rows (every one masked, the costliest input) that
    one forward fits in memory, at most ``max_batch``: accelerate's ``find_executable_batch_size``
    retries at a smaller size after each out-of-memory error."""
    from accelerate.utils import find_executable_batch_size

    device = next(model.parameters()).device

    @find_executable_batch_size(starting_batch_size=max_batch)
    def probe(batch_size: int) -> int:
        model(input_ids=torch.full((batch_size, max_length), mask_id, dtype=torch.long, device=device))
        return batch_size

    chosen = probe()
    log.info("batch_size=auto: %d rows of %d tokens per forward", chosen, max_length)
    return chosen


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows (``get_rolling_token_windows`` + ``make_disjoint_window``) as
    ``(context, target)`` pairs a diffusion model scores whole: every token a target exactly once,
    each pair ``<= max_length`` tokens with as much preceding context as fits (the first window's
    context is the prefix token)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too small for rolling windows")
    # an AR window of n inputs scores n tokens; fed whole (context ⊕ target) it is one token longer
    windows = get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix, max_seq_len=max_length - 1, context_len=1
    )
    return [(list(context), list(target)) for context, target in map(make_disjoint_window, windows)]
