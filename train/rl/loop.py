"""The RL fine-tuning loop: ``dlm rl RECIPE.yaml key=value ...`` / ``accelerate launch -m dlm.train.rl``.

Each step: draw ``prompts_per_step`` task prompts per process (a fixed function of the seed and
the step, so a resumed run sees the same prompts), decode ``group_size`` completions of each with
the configured decoder (``step_map`` and decode-time log-probs recorded), score them with the
rewards, form group-relative advantages (zero-variance groups counted and optionally dropped),
build log-prob rows with the chosen estimator (trajectory rows once; one-step / coupled masks
redrawn for every inner update), and run ``inner_updates`` clipped policy-gradient updates
against the rollout-time log-probs. Held-out reward (greedy decoding of fixed prompts) is
evaluated every ``eval_every`` steps. Checkpoints, exact resume and the JSONL log work as in
pretraining; ``run.json`` records the recipe and wall time.

Prompts come from a dlm task or any reasoning-gym dataset (``rl.task``), formatted as in SFT
(chat template, optional ``rl.system_prompt``). The policy is a dlm checkpoint or any masked
diffusion checkpoint transformers can load (``rl.init`` hub id, ``rl.trust_remote_code``,
``rl.dtype``, ``rl.mask_token_id``); ``lora.r > 0`` trains peft adapters and uses the base
(adapters off) as the KL reference. Random draws (rollouts, masks) come from generators per
prompt group, and each process divides its loss by its share of the global batch's count, so N
processes reproduce one process with the same global batch.

Engines (the accelerate config): one process, DDP, or FSDP2 with the policy and the reference
sharded (LoRA too: base and adapters sharded together) — rollouts then decode on gathered weights
(``engine.gathered``: each process decodes for as many steps as its prompts take) and row forwards
are evened out across processes. The loss backpropagates one row batch at a time
(``backward_by_row_batch``), so memory is bounded by ``rl.row_batch_size``, not by the step's rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModel

from dlm.config import ConfigError, to_dict
from dlm.data import encode_prompts
from dlm.decode import build_decoder
from dlm.decode.blocks import block_causal_size
from dlm.decode.stopping import until_eos
from dlm.model.convert import is_hub_id
from dlm.tasks import generate
from dlm.train.checkpoint import expected_files, export_final, load_checkpoint, save_checkpoint
from dlm.train.config import LoraConfig, OptimConfig, TrainConfig
from dlm.train.engine import engine_name, gathered, is_sharded, make_accelerator, most_across, shard_frozen
from dlm.train.loop import open_resume, param_groups, trim_log, warmup_cosine
from dlm.train.rl.estimators import ESTIMATORS, Rollouts, Rows, build_rows, concat_rows, token_logprobs
from dlm.train.rl.loss import NORMS, group_advantages, loss_count, policy_loss
from dlm.train.rl.rewards import RewardError, combine, resolve
from dlm.train.rundir import RunLock, identity
from dlm.utils import pyplot, save_figure, seed_of, torch_dtype, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLConfig:
    init: str = ""
    """Checkpoint to start from: an SFT'd model directory, a training output_dir, or a hub id
    (``GSAI-ML/LLaDA-8B-Instruct``). Required."""
    trust_remote_code: bool = False
    """Load checkpoints that ship their own modelling code (LLaDA, Dream)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype the policy is loaded in (bfloat16 for 8B models; LoRA adapters stay float32)."""
    mask_token_id: int | None = None
    """The mask token, when the checkpoint's config has none."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (long completions on a large model)."""
    task: str = "repeat"
    """Generated task the prompts come from: a dlm.tasks name or any reasoning-gym dataset."""
    task_args: dict[str, Any] | None = field(default_factory=dict)
    """The task's arguments; ``null`` (e.g. ``rl.task_args=null`` on the command line) = its defaults."""
    system_prompt: str = ""
    """A system message put before every prompt (e.g. the answer format the reward checks)."""
    rewards: dict[str, float] = field(default_factory=lambda: {"repeat": 1.0})
    """Reward name (or module:function) -> weight."""
    prompts_per_step: int = 4
    """Prompts per process per step."""
    group_size: int = 4
    """Completions per prompt (group-relative advantages need >= 2)."""
    estimator: str = "trajectory"
    """trajectory (TraceRL), one_step (diffu-GRPO) or coupled (coupled-GRPO)."""
    shrink: int = 1
    """trajectory: decoding steps merged per row (1 = exact)."""
    p_mask: float = 0.15
    """one_step: prompt masking probability."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    """KL (k3) weight to the frozen initial model; 0 = no reference model."""
    scale_std: bool = False
    drop_zero_variance: bool = True
    inner_updates: int = 1
    loss_after_eos: bool = True
    """Train the tokens decoded after a completion's first EOS too (they are part of the decoding
    trajectory). ``false`` drops them from the loss, as GRPO implementations for LLaDA (d1) do."""
    norm: str = "token"
    """Loss normalisation: token, sequence (length), step (each decoding step counts once) or none."""
    row_batch_size: int = 32
    """Log-prob rows per forward. The loss backpropagates one such batch at a time, so this (not the
    number of rows a step makes) bounds the activations RL holds."""
    eval_every: int = 10
    eval_prompts: int = 32
    save_rollouts_every: int = 10
    """Every N steps, append that step's rollouts (prompt, completion, step_map, decode-time
    log-probs, rewards, group, decoder settings) to ``rollouts-<rank>.jsonl``; 0 = never."""

    init_command: str = ""
    """The command that creates ``init`` (a recipe's SFT step), shown when ``init`` is missing."""

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """How ``init`` (and the frozen reference) load: dtype and remote code."""
        return {"dtype": torch_dtype(self.dtype), "trust_remote_code": self.trust_remote_code}

    def __post_init__(self):
        if not self.init:
            raise ConfigError("rl.init is required: the checkpoint to fine-tune (e.g. an SFT run's output_dir)")
        if self.group_size < 2:
            raise ConfigError(
                f"rl.group_size={self.group_size}: group-relative advantages need at least 2 completions per "
                "prompt (a group of 1 gives no signal)"
            )
        if self.norm not in NORMS:
            raise ConfigError(f"rl.norm={self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"rl.estimator={self.estimator!r}; choose one of {', '.join(ESTIMATORS.names())}")
        for name in ("prompts_per_step", "inner_updates", "shrink", "row_batch_size", "eval_every", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name}={getattr(self, name)} must be >= 1")
        for name in ("beta", "eps_low", "eps_high"):  # a negative KL weight or clip range means nothing
            if getattr(self, name) < 0:
                raise ConfigError(f"rl.{name}={getattr(self, name)} must be >= 0")
        if self.task_args is None:
            object.__setattr__(self, "task_args", {})
        try:
            generate(self.task, 1, seed=0, **self.task_args)
        except ValueError as exc:
            raise ConfigError(f"rl.task: {exc}") from None
        for name in self.rewards:
            try:
                resolve(name)
            except RewardError as exc:
                raise ConfigError(f"rl.rewards: {exc}") from None


@dataclass(frozen=True)
class RLRecipe:
    seed: int = 0
    rl: RLConfig = field(default_factory=RLConfig)
    decode: dict[str, Any] = field(default_factory=lambda: {"decoder": "confidence", "gen_length": 64})
    """The rollout decoder: ``decoder`` (name) plus its settings (gen_length, steps, block_length, ...)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, weight_decay=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/rl", max_steps=50))
    lora: LoraConfig = field(default_factory=LoraConfig)
    """``lora.r > 0``: train low-rank adapters (peft) instead of every weight."""


def make_decoder(settings: dict[str, Any], greedy: bool = False):
    from dlm.decode.presets import apply_preset

    s = apply_preset(settings)  # a decode preset (dlm tune); settings beside it win
    name = s.pop("decoder", "confidence")
    if greedy:
        s["temperature"] = 0.0
    try:
        return build_decoder(name, eos_token_id=s.pop("eos_token_id", None), **s)
    except ValueError as exc:
        raise ConfigError(f"decode: {exc}") from None


def completions_of(tok, generated: torch.Tensor) -> tuple[list[str], list[int]]:
    texts, lengths = [], []
    for row in generated.tolist():
        row = until_eos(row, tok.eos_token_id)
        texts.append(tok.decode(row, skip_special_tokens=True))
        lengths.append(len(row))
    return texts, lengths


def fields_of(examples: list[dict]) -> dict[str, list]:
    keys = [k for k in examples[0] if k != "prompt"]
    return {k: [e[k] for e in examples] for k in keys}


@torch.no_grad()
def held_out_reward(model, tok, cfg: RLRecipe, device, settings: dict[str, Any]) -> float:
    """Mean reward of greedy decoding (``settings`` = the rollout decoder's) on fixed prompts."""
    examples = generate(cfg.rl.task, cfg.rl.eval_prompts, seed=987_654, **cfg.rl.task_args)
    decoder = make_decoder(settings, greedy=True)
    was_training = model.training
    model.eval()  # no dropout (LoRA's) in what is reported
    total = []
    for start in range(0, len(examples), 16):
        chunk = examples[start : start + 16]
        ids, pad = (t.to(device) for t in encode_prompts(tok, [e["prompt"] for e in chunk], cfg.rl.system_prompt))
        out = decoder(model, ids, attention_mask=pad)
        texts, _ = completions_of(tok, out.generated)
        values, _ = combine(dict(cfg.rl.rewards), [e["prompt"] for e in chunk], texts, **fields_of(chunk))
        total.extend(values)
    model.train(was_training)
    return sum(total) / len(total)


def group_generator(*key: int) -> torch.Generator:
    """A generator seeded by integers only (their tuple hash is the same in every process)."""
    return torch.Generator().manual_seed(seed_of(*key))


def decode_groups(decoder, model, ids, pad, cfg: RLRecipe, step: int, first: int, n: int):
    """Decode ``n`` prompt groups of ``group_size`` rows, group ``j`` with a generator seeded by
    ``(seed, step, first + j)``; returns one DecodeOutput-like batch."""
    from dlm.decode.output import DecodeOutput

    G = cfg.rl.group_size
    outs = []
    for j in range(n):
        g = group_generator(cfg.seed, step, first + j)
        rows = slice(j * G, (j + 1) * G)
        outs.append(decoder(model, ids[rows], attention_mask=pad[rows], generator=g))
    cat = lambda name: torch.cat([getattr(o, name) for o in outs])  # noqa: E731
    return DecodeOutput(
        cat("tokens"),
        cat("step_map"),
        cat("logprobs"),
        cat("nfe"),
        sum(o.model_calls for o in outs),
        outs[0].prompt_length,
        canvas=cat("canvas"),
    )


def after_first_eos(tokens: torch.Tensor, prompt_length: int, eos_id: int | None) -> torch.Tensor:
    """``[B, T]``: completion positions after the first EOS of each row (the EOS itself excluded)."""
    out = torch.zeros_like(tokens, dtype=torch.bool)
    if eos_id is None:
        return out
    is_eos = tokens[:, prompt_length:] == eos_id
    seen = is_eos.long().cumsum(1)
    out[:, prompt_length:] = (seen > 1) | ((seen == 1) & ~is_eos)
    return out


def save_rollouts(path: Path, step: int, first: int, examples, texts, rollout, rewards, parts, cfg: RLRecipe) -> None:
    """One JSONL record per completion: what was decoded, in which order, and how it scored."""
    P, G = rollout.prompt_length, cfg.rl.group_size
    with open(path, "a") as fh:
        for i, (example, text) in enumerate(zip(examples, texts)):
            record = {
                "step": step,
                "group": first + i // G,
                "prompt": example["prompt"],
                "completion": text,
                "reward": rewards[i],
                "rewards": {k: v[i] for k, v in parts.items()},
                "tokens": rollout.canvas[i, P:].tolist(),  # as decoded (mask id where never decoded)
                "step_map": rollout.step_map[i, P:].tolist(),
                "logprobs": [round(x, 6) for x in rollout.logprobs[i, P:].tolist()],
                "decoder": cfg.decode,
            }
            fh.write(json.dumps(record) + "\n")


def make_rows(cfg: RLRecipe, r: Rollouts, mask_id: int, block, step: int, first: int, n: int, inner: int):
    """The estimator's rows for ``n`` prompt groups; random masks come from one generator per group
    seeded by ``(seed, step, first + j, inner)``, so N processes draw what one process would."""
    name = cfg.rl.estimator
    if name == "trajectory":
        return build_rows(name, r, mask_id, shrink=cfg.rl.shrink, block_size=block)
    kw = {"p_mask": cfg.rl.p_mask} if name == "one_step" else {}
    G = cfg.rl.group_size
    parts = []
    for j in range(n):
        g = group_generator(cfg.seed, step, first + j, inner, 1)
        parts.append(
            build_rows(name, r.select(slice(j * G, (j + 1) * G)), mask_id, generator=g, block_size=block, **kw)
        )
    return concat_rows(parts, [G] * n)


def row_forwards(rows: Rows, batch_size: int) -> int:
    """Model calls ``token_logprobs`` makes for ``rows`` in batches of ``batch_size``."""
    return -(-rows.inputs.shape[0] // batch_size)


ROW_FIELDS = ("inputs", "targets", "weights", "owner")


def row_batches(rows: Rows, batch_size: int, calls: int) -> list[tuple[Rows, bool]]:
    """``rows`` cut into batches of ``batch_size`` (each with ``True``: it counts), then repeats of the
    first batch (``False``: weight zero) up to ``calls`` batches. Under a sharded engine every process
    must make as many forwards (and backwards) as the busiest one: the repeats score the first batch
    again with weight zero, so the output and its gradients are unchanged and every parameter still
    takes part in each collective."""
    cut = [
        (dataclasses.replace(rows, **{f: getattr(rows, f)[i : i + batch_size] for f in ROW_FIELDS}), True)
        for i in range(0, rows.inputs.shape[0], batch_size)
    ]
    if not cut and calls > 0:
        raise ValueError("row_batches: extra forwards need at least one row to repeat")
    return cut + [(cut[0][0], False)] * (calls - len(cut))


def evened_logprobs(model, r: Rollouts, rows: Rows, mask_id: int, batch_size: int, calls: int) -> torch.Tensor:
    """``token_logprobs`` making at least ``calls`` model calls (see ``row_batches``)."""
    out = token_logprobs(model, r, rows, mask_id, batch_size)
    for part, _ in row_batches(rows, batch_size, calls)[row_forwards(rows, batch_size) :]:
        out = out + 0.0 * token_logprobs(model, r, part, mask_id, batch_size).sum()
    return out


def backward_by_row_batch(acc: Accelerator, model, r: Rollouts, rows: Rows, mask_id: int, batch_size: int,
                          calls: int, loss_of, local: bool):  # fmt: skip
    """``loss_of(token log-probs)``'s backward with at most one row batch's graph alive at a time.

    The loss depends on the weights only through the ``[B, T]`` log-probs, a sum of one term per
    row batch, so its gradient is ``Σ_b J_bᵀ g`` with ``g = ∂loss/∂logp``: a no-grad pass computes
    the log-probs and ``g``, then each batch is run again and back-propagated with ``g`` as its
    output gradient. Exact (each batch replays its first pass's RNG state, so dropout draws the same
    masks) at the cost of one extra no-grad forward per batch — where one batch holds every row,
    the plain backward. ``local``: gradients are averaged only at the last backward (DDP); a
    sharded engine reduce-scatters at each one, keeping the gradients sharded. Returns the
    ``PolicyLoss`` of ``loss_of`` (its ``loss`` detached)."""
    batches = row_batches(rows, batch_size, calls)
    if len(batches) <= 1:
        with acc.autocast():
            new = token_logprobs(model, r, rows, mask_id, batch_size)
        res = loss_of(new)
        acc.backward(res.loss)
        return dataclasses.replace(res, loss=res.loss.detach())
    cuda = acc.device.type == "cuda"
    states, logp = [], None
    with torch.no_grad(), acc.autocast():
        for part, counts in batches:  # a repeated batch is still run: sharded forwards are collective
            states.append((torch.get_rng_state(), torch.cuda.get_rng_state(acc.device) if cuda else None))
            scored = token_logprobs(model, r, part, mask_id, batch_size)
            if counts:
                logp = scored if logp is None else logp + scored
    logp = logp.requires_grad_()
    res = loss_of(logp)
    (grad,) = torch.autograd.grad(res.loss, logp)
    for j, ((part, counts), (cpu_state, cuda_state)) in enumerate(zip(batches, states)):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, acc.device)
        sync = acc.no_sync(model) if local and j < len(batches) - 1 else contextlib.nullcontext()
        with sync:
            with acc.autocast():
                scored = token_logprobs(model, r, part, mask_id, batch_size)
            acc.backward((scored * (grad if counts else torch.zeros_like(grad))).sum())
    return dataclasses.replace(res, loss=res.loss.detach())


def reference_logprobs(plain, ref, r: Rollouts, rows, mask_id: int, cfg: RLRecipe, calls: int) -> torch.Tensor:
    """Row log-probs under the frozen reference: the initial model, or (LoRA) the adapters switched off."""
    if ref is not None:
        return evened_logprobs(ref, r, rows, mask_id, cfg.rl.row_batch_size, calls)
    with plain.disable_adapter():
        return evened_logprobs(plain, r, rows, mask_id, cfg.rl.row_batch_size, calls)


def loss_share(acc: Accelerator, trainable: torch.Tensor, cfg: RLRecipe, step_map: torch.Tensor) -> float | None:
    """This process's divisor of the policy loss: the global batch's count (tokens, rollouts or
    steps, as ``rl.norm`` says) over the number of processes, whose gradients are averaged — so N
    processes train as one process would on the whole global batch, however unevenly their
    rollouts ended. ``None`` in one process (the batch's own count)."""
    world = acc.num_processes
    if world == 1:
        return None
    if cfg.rl.norm == "none":
        return 1.0 / world
    local = torch.tensor([loss_count(trainable, cfg.rl.norm, step_map)], device=acc.device, dtype=torch.float64)
    total = float(acc.reduce(local, reduction="sum"))
    return max(total, 1.0) / world


def check_init(rl: RLConfig) -> None:
    """A local ``rl.init`` that holds no model is answered before anything is created, with the
    command that makes it when the recipe names one (then ``init`` is that command's output, never
    a hub id; other hub ids are the loader's to fetch)."""
    from dlm.loading import resolve_checkpoint

    if is_hub_id(str(rl.init)) and not rl.init_command:
        return
    try:
        resolve_checkpoint(rl.init)
    except FileNotFoundError as exc:
        hint = f" Create it first: {rl.init_command}" if rl.init_command else ""
        raise ConfigError(f"rl.init={rl.init!r}: {exc}.{hint}") from None


def main(cfg: RLRecipe) -> dict[str, Any]:
    t0 = time.time()
    check_init(cfg.rl)
    out = Path(cfg.train.output_dir)
    acc = make_accelerator(mixed_precision=cfg.train.mixed_precision)  # DDP or FSDP2: the accelerate config says
    check_engine(acc)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.seed)
    lock = RunLock(out) if acc.is_main_process else None
    if lock is not None:
        lock.acquire()  # one run per output_dir
    try:
        return _run(cfg, acc, out, t0)
    finally:
        if lock is not None:
            lock.release()


def check_engine(acc: Accelerator) -> None:
    """dlm rl trains on one process, DDP or FSDP2 (full or LoRA); refuse what it does not run."""
    engine = engine_name(acc)
    if engine == "deepspeed":
        raise ConfigError(
            "dlm rl does not run under DeepSpeed yet (rollouts need whole weights on every process); "
            "launch it with recipes/accelerate/fsdp2.yaml (sharded) or ddp.yaml"
        )
    if engine == "fsdp1":
        raise ConfigError("dlm rl shards with FSDP2 only: set fsdp_version: 2 (recipes/accelerate/fsdp2.yaml)")


@dataclass
class RLRun:
    """What one RL run holds: the prepared policy (``model``) and its plain module (``plain``:
    decoding and log-prob forwards), the frozen reference, the decoder and where it logs."""

    cfg: RLRecipe
    acc: Accelerator
    out: Path
    model: torch.nn.Module
    plain: torch.nn.Module
    ref: torch.nn.Module | None
    tok: Any
    init: Path
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mask_id: int
    decode_settings: dict[str, Any]
    global_batch: int
    history: list[dict] = field(default_factory=list)

    @property
    def sharded(self) -> str | None:
        return engine_name(self.acc) if is_sharded(self.acc) else None

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    @property
    def rollouts_path(self) -> Path:
        return self.out / f"rollouts-{self.acc.process_index}.jsonl"

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.acc.is_main_process:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def held_out(self) -> float:
        with torch.no_grad(), gathered(self.plain, self.acc):  # every process decodes the same prompts
            return held_out_reward(self.plain, self.tok, self.cfg, self.acc.device, self.decode_settings)


@dataclass
class StepRollouts:
    """One step's rollouts on this process: its prompt groups, what was decoded and how it scored."""

    examples: list[dict]  # one per row (each prompt repeated group_size times)
    rollout: Any  # the DecodeOutput of the groups
    texts: list[str]
    lengths: list[int]
    rewards: list[float]  # [N], as the rewards returned them
    parts: dict[str, list[float]]  # each reward's share of ``rewards``
    advantages: torch.Tensor  # [N]
    zero_variance: torch.Tensor  # [N] rows of a group whose rewards are all equal
    rows: Rollouts
    trainable: torch.Tensor  # [N, T] positions the loss trains


def _run(cfg: RLRecipe, acc: Accelerator, out: Path, t0: float) -> dict[str, Any]:
    """Setup → rollouts, rewards and clipped updates step by step → export."""
    expected = expected_files(False, lora=cfg.lora.enabled, sharded=engine_name(acc) if is_sharded(acc) else None,
                              world=acc.num_processes)  # fmt: skip
    global_batch = cfg.rl.prompts_per_step * cfg.rl.group_size * acc.num_processes
    resume_from, _ = open_resume(acc, cfg, out, expected, global_batch)
    run = _setup(cfg, acc, out, global_batch)
    start = _resume_or_start(run, resume_from)
    decoder = make_decoder(run.decode_settings)
    if start == 0:
        run.write({"step": 0, "held_out_reward": run.held_out()})
    bar = tqdm(range(start, cfg.train.max_steps), desc="dlm rl", disable=not acc.is_main_process, initial=start)
    for step in bar:
        batch = _rollouts(run, decoder, step)
        stats = _update(run, batch, step)
        if cfg.rl.save_rollouts_every and (step + 1) % cfg.rl.save_rollouts_every == 0:
            n, rank = cfg.rl.prompts_per_step, acc.process_index
            save_rollouts(run.rollouts_path, step + 1, rank * n, batch.examples, batch.texts, batch.rollout,
                          batch.rewards, batch.parts, cfg)  # fmt: skip
        record = _step_record(run, batch, stats, step)
        if (step + 1) % cfg.rl.eval_every == 0 or step + 1 == cfg.train.max_steps:
            record["held_out_reward"] = run.held_out()
        run.write(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        if (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.max_steps:
            state = {"identity": identity(cfg, global_batch, engine_name(acc))}
            save_checkpoint(acc, out, step + 1, run.model, run.tok, run.optimizer, run.scheduler, None, state,
                            cfg.train.keep_checkpoints)  # fmt: skip
    return _export(run, start, t0)


def _setup(cfg: RLRecipe, acc: Accelerator, out: Path, global_batch: int) -> RLRun:
    """The policy from ``rl.init`` (LoRA-wrapped, or beside a frozen reference when ``beta > 0``),
    its optimiser and schedule, prepared for the engine."""
    from dlm.loading import load as load_model

    load = cfg.rl.load_kwargs
    model, tok, init = load_model(cfg.rl.init, **load)
    mask_id = cfg.rl.mask_token_id if cfg.rl.mask_token_id is not None else getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise ConfigError(
            f"the model at {init} has no mask_token_id in its config; set rl.mask_token_id (LLaDA: 126336)"
        )
    if cfg.rl.gradient_checkpointing:
        try:
            model.gradient_checkpointing_enable()
        except ValueError as exc:
            raise ConfigError(f"rl.gradient_checkpointing: {exc} Set rl.gradient_checkpointing=false.") from None
        if cfg.lora.enabled:
            model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad path
    ref = None
    if cfg.lora.enabled:
        model = cfg.lora.wrap(model)  # the reference is this model with its adapters switched off
    elif cfg.rl.beta > 0:
        ref = AutoModel.from_pretrained(init, **load).to(acc.device).eval()
        ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
    )
    steps_total = cfg.train.max_steps * cfg.rl.inner_updates
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, steps_total, cfg.optim.min_lr_ratio)
    )
    model, optimizer = acc.prepare(model, optimizer)
    plain = acc.unwrap_model(model)  # FSDP2 shards in place: there the plain model is the sharded one
    if ref is not None:
        ref = shard_frozen(ref, acc)
    decode_settings = {"mask_token_id": mask_id, **cfg.decode}
    return RLRun(cfg, acc, out, model, plain, ref, tok, init, optimizer, scheduler, int(mask_id), decode_settings,
                 global_batch)  # fmt: skip


def _resume_or_start(run: RLRun, resume_from: Path | None) -> int:
    """The step to start from; a resumed run rewrites what follows its checkpoint in the log and
    in each process's rollouts file, a fresh run starts both anew."""
    acc = run.acc
    if acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    start = 0
    if resume_from is not None:
        start = load_checkpoint(acc, resume_from, run.model, run.optimizer, run.scheduler, None)["step"]
    for path in [run.rollouts_path] + ([run.log_path] if acc.is_main_process else []):
        if start:
            trim_log(path, start)
        else:
            path.unlink(missing_ok=True)
    return start


def _rollouts(run: RLRun, decoder, step: int) -> StepRollouts:
    """This process's prompt groups of step ``step``, decoded (one generator per group: N processes
    sample what one would), scored, and the group-relative advantages of their rewards."""
    cfg, acc = run.cfg, run.acc
    n, rank, G = cfg.rl.prompts_per_step, acc.process_index, cfg.rl.group_size
    examples = generate(cfg.rl.task, n * acc.num_processes, seed=cfg.seed * 1_000_003 + step, **cfg.rl.task_args)
    expanded = [e for e in examples[rank * n : (rank + 1) * n] for _ in range(G)]
    prompts = [e["prompt"] for e in expanded]
    ids, pad = (t.to(acc.device) for t in encode_prompts(run.tok, prompts, cfg.rl.system_prompt))
    run.plain.eval()
    # a sharded model is gathered first, as each process decodes its own prompts for as many steps as they take
    with torch.no_grad(), gathered(run.plain, acc):
        rollout = decode_groups(decoder, run.plain, ids, pad, cfg, step, rank * n, n)
    texts, lengths = completions_of(run.tok, rollout.generated)
    rewards, parts = combine(dict(cfg.rl.rewards), prompts, texts, **fields_of(expanded))
    adv, zero = group_advantages(torch.tensor(rewards), torch.arange(n).repeat_interleave(G), cfg.rl.scale_std)
    keep = ~zero if cfg.rl.drop_zero_variance else torch.ones_like(zero)
    full_pad = torch.cat([pad, torch.ones_like(rollout.generated)], dim=1)
    # rows rebuild the states the model saw: the decoded canvas, not the EOS-filled text view
    r = Rollouts(rollout.canvas, rollout.step_map, rollout.prompt_length, full_pad)
    trainable = r.trainable & keep[:, None].to(r.tokens.device)
    if not cfg.rl.loss_after_eos:
        trainable &= ~after_first_eos(r.tokens, r.prompt_length, run.tok.eos_token_id)
    return StepRollouts(expanded, rollout, texts, lengths, rewards, parts, adv, zero, r, trainable)


def _update(run: RLRun, batch: StepRollouts, step: int) -> dict[str, float]:
    """``rl.inner_updates`` clipped policy-gradient updates on the step's rollouts; every process
    updates when any has something to train (gradients are averaged collectively)."""
    cfg, acc, plain, r = run.cfg, run.acc, run.plain, batch.rows
    stats = {"clip_fraction": 0.0, "kl": 0.0, "loss": 0.0}
    if not most_across(acc, int(batch.trainable.any())):
        return stats
    n, rank, size = cfg.rl.prompts_per_step, acc.process_index, cfg.rl.row_batch_size
    # trajectory rows are fixed by the rollout; one_step / coupled draw new masks for every inner
    # update (diffu-GRPO), and the old / reference log-probs are those of each draw
    fresh = cfg.rl.estimator != "trajectory"
    draws = [
        make_rows(cfg, r, run.mask_id, block_causal_size(plain), step, rank * n, n, i)
        for i in range(cfg.rl.inner_updates if fresh else 1)
    ]
    # sharded forwards are collective: every process makes as many as the busiest one (DDP forwards
    # are local; it only needs every process to make the one backward)
    calls = [row_forwards(rows, size) for rows in draws]
    if run.sharded is not None:
        calls = [most_across(acc, c) for c in calls]
    with torch.no_grad(), acc.autocast():  # the reference under the policy's precision
        olds = [evened_logprobs(plain, r, rows, run.mask_id, size, c) for rows, c in zip(draws, calls)]
        refs = [
            reference_logprobs(plain, run.ref, r, rows, run.mask_id, cfg, c) if cfg.rl.beta > 0 else None
            for rows, c in zip(draws, calls)
        ]
    share = loss_share(acc, batch.trainable, cfg, r.step_map)
    plain.train()
    for i in range(cfg.rl.inner_updates):
        k = i if fresh else 0

        def loss_of(new, old=olds[k], ref=refs[k]):
            return policy_loss(new, old, batch.advantages.to(new.device), batch.trainable, cfg.rl.eps_low,
                               cfg.rl.eps_high, ref, cfg.rl.beta, cfg.rl.norm, r.step_map, share)  # fmt: skip

        # through the prepared model, whose engine averages the gradients in the backward (DDP
        # all-reduces once, after the last row batch; FSDP2 reduce-scatters each one)
        res = backward_by_row_batch(acc, run.model, r, draws[k], run.mask_id, size, calls[k], loss_of,
                                    local=run.sharded is None)  # fmt: skip
        if cfg.optim.grad_clip > 0:
            acc.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        stats = {"clip_fraction": res.clip_fraction, "kl": res.kl, "loss": float(res.loss)}
    return stats


STEP_STATISTICS = (  # averaged over processes, one all-reduce for all of them
    "reward_mean", "reward_std", "accuracy", "zero_variance_share", "completion_length", "clip_fraction", "kl",
)  # fmt: skip


def _step_record(run: RLRun, batch: StepRollouts, stats: dict[str, float], step: int) -> dict[str, Any]:
    """The log record of a step: its named statistics averaged over processes (the loss and the
    per-reward parts are this process's)."""
    rewards = torch.tensor(batch.rewards)
    local = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "accuracy": float((rewards >= 1.0).float().mean()),
        "zero_variance_share": float(batch.zero_variance.float().mean()),
        "completion_length": sum(batch.lengths) / len(batch.lengths),
        "clip_fraction": stats["clip_fraction"],
        "kl": stats["kl"],
    }
    values = torch.tensor([local[name] for name in STEP_STATISTICS], device=run.acc.device)
    mean = dict(zip(STEP_STATISTICS, run.acc.reduce(values, reduction="mean").tolist()))
    return {
        "step": step + 1,
        **mean,
        "loss": stats["loss"],
        "lr": run.scheduler.get_last_lr()[0],
        **{f"reward/{k}": sum(v) / len(v) for k, v in batch.parts.items()},
    }


def _export(run: RLRun, start: int, t0: float) -> dict[str, Any]:
    """``final/`` (and ``adapter/`` for LoRA), the reward plot and ``run.json``."""
    from dlm.loading import load as load_model

    cfg, acc, out, plain = run.cfg, run.acc, run.out, run.plain
    acc.wait_for_everyone()
    final = None
    if run.sharded is not None and cfg.lora.enabled:
        state = acc.get_state_dict(run.model)  # collective: the adapter-wrapped model's full state, on the main process
        if acc.is_main_process:  # an unsharded copy to export from (the base's size in CPU memory)
            whole = cfg.lora.wrap(load_model(run.init, **cfg.rl.load_kwargs)[0])
            whole.load_state_dict(state)
            final, plain = export_lora(out, whole, run.tok)
    elif run.sharded is not None:  # every process takes part in gathering the full state dict
        final = export_final(out / "final", plain, run.tok, None, acc)
    elif acc.is_main_process:
        if cfg.lora.enabled:
            final, plain = export_lora(out, plain, run.tok)
        else:
            final = export_final(out / "final", plain, run.tok, None)
    if acc.is_main_process and cfg.train.plot:
        plot_rewards(run.log_path, out / "rewards.png")
    held = [h["held_out_reward"] for h in run.history if "held_out_reward" in h]
    if acc.is_main_process:  # what `dlm rl-compare` tabulates (wall time of this invocation)
        summary = {"recipe": to_dict(cfg), "wall_seconds": round(time.time() - t0, 1), "resumed_at": start}
        write_json(out / "run.json", summary, indent=1)
    acc.print(
        f"done in {time.time() - t0:.0f}s | held-out reward {held[0] if held else float('nan'):.4f} -> "
        f"{held[-1] if held else float('nan'):.4f} | model: {final}"
    )
    return {"history": run.history, "final": final, "model": plain}


def export_lora(out: Path, model, tok):
    """A LoRA run's exports: the adapter alone (``adapter/``), then the merged model every dlm tool
    loads (``final/``). Returns the path of ``final/`` and the merged model."""
    export_final(out / "adapter", model, tok, None)
    merged = model.merge_and_unload()
    return export_final(out / "final", merged, tok, None), merged


def plot_rewards(log_path: Path, png: Path) -> None:
    plt = pyplot()
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
    held = [(r["step"], r["held_out_reward"]) for r in rows if "held_out_reward" in r]
    if train:
        ax.plot(*zip(*train), label="rollout reward", alpha=0.6)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out reward (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
