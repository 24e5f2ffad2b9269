"""The one training loop for every objective (MDLM, exact-count, SFT, AR).

    dlm train recipes/quickstart.yaml train.max_steps=2000
    accelerate launch -m dlm.train recipes/quickstart.yaml            # any accelerate config
    accelerate launch --multi_gpu --num_processes 2 -m dlm.train recipes/quickstart.yaml

Setup → loop → save. Distribution, mixed precision and trackers come from accelerate. Each
step draws its global batch and noise as fixed functions of ``(seed, step)`` (see
``dlm.data`` and ``dlm.train.objectives``), which is what makes resume exact and N processes
equal to one with the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from dlm.config import ConfigError, to_dict
from dlm.data import DataBundle, build_data
from dlm.model.build import build_model, init_checkpoint
from dlm.train.checkpoint import expected_files, export_final, list_checkpoints, load_checkpoint, save_checkpoint
from dlm.train.config import RecipeConfig
from dlm.train.ema import EMA
from dlm.train.engine import engine_name, is_sharded, make_accelerator
from dlm.train.objectives import Objective, build_objective
from dlm.train.rundir import RunLock, checkpoint_problem, identity, identity_changes, set_aside

log = logging.getLogger("dlm.train")


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/inf; training stopped before applying the update."""


@dataclass
class TrainResult:
    output_dir: Path
    final_step: int
    val_ppl: float | None
    bound: str
    unigram_ppl: float | None
    wall_time_s: float
    losses: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    model: torch.nn.Module | None = None
    """The trained model on this process (unwrapped; EMA weights are in output_dir/final)."""


def bound_label(bound: str) -> str:
    return "NELBO perplexity bound" if bound == "nelbo" else "perplexity"


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_resume(
    resume: str, output_dir: Path, expected: list[str] | None = None, check=None, report=log.warning
) -> Path | None:
    """The checkpoint to resume from. With ``expected`` (the main process), each candidate is first
    offered to ``check(state, path)`` (which refuses another recipe's checkpoint), then its files are
    checked: a newest checkpoint that cannot be loaded is reported, set aside as
    ``broken-checkpoint-<step>`` and the previous complete one is used."""
    existing = list_checkpoints(output_dir)
    if resume == "auto":
        while existing and expected is not None:
            problem = _resume_problem(existing[-1], expected, check)
            if problem is None:
                break
            moved = set_aside(existing.pop())
            report(f"{moved.name.removeprefix('broken-')} cannot be resumed from ({problem}); kept as {moved.name}")
        return existing[-1] if existing else None
    if resume == "never":
        if existing:
            raise ConfigError(
                f"train.output_dir={str(output_dir)!r} already holds {existing[-1].name}; continue it "
                "with train.resume=auto, or choose a new train.output_dir (nothing was overwritten)"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"train.resume={resume!r}: no such checkpoint directory; use auto, never, or a checkpoint-<step> directory"
        )
    problem = _resume_problem(path, expected, check) if expected is not None else None
    if problem is not None:
        raise ConfigError(f"train.resume={resume!r} cannot be resumed from: {problem}")
    return path


def _resume_problem(path: Path, expected: list[str], check) -> str | None:
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json does not read ({exc})"
    if check is not None:
        check(state, path)  # another recipe's checkpoint is refused, not set aside
    return checkpoint_problem(path, expected)


def check_resumable(state: dict, cfg, global_batch: int, where: Path, engine: str = "no") -> None:
    """Refuse a checkpoint of another recipe (or another engine: the checkpoint formats differ), or
    one already past ``train.max_steps``."""
    recorded = state.get("identity")
    if recorded is not None:
        changes = identity_changes(recorded, identity(cfg, global_batch, engine))
        if changes:
            raise ConfigError(
                f"train.output_dir={str(where.parent)!r} holds a run of another recipe ({where.name}): "
                + "; ".join(changes)
                + ". Choose another train.output_dir for this recipe (nothing was changed), or continue that run "
                "with the recipe that made it"
            )
    if state["step"] > cfg.train.max_steps:
        raise ConfigError(
            f"{where} is at step {state['step']}, past train.max_steps={cfg.train.max_steps}; raise "
            "train.max_steps to continue it, or choose another train.output_dir (nothing was changed)"
        )


def open_resume(accelerator, cfg, out: Path, expected: list[str], global_batch: int) -> tuple[Path | None, dict]:
    """The checkpoint this run resumes from and its trainer state (``(None, {})`` for a fresh run):
    the main process checks candidates (refusing another recipe's, setting broken ones aside), the
    others then take what it kept."""
    engine = engine_name(accelerator)
    check = lambda state, path: check_resumable(state, cfg, global_batch, path, engine)  # noqa: E731
    resume_from = resolve_resume(cfg.train.resume, out, expected if accelerator.is_main_process else None, check)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and cfg.train.resume == "auto":
        resume_from = resolve_resume(cfg.train.resume, out)  # what the main process kept
    if resume_from is None:
        return None, {}
    state = json.loads((resume_from / "trainer_state.json").read_text())
    check_resumable(state, cfg, global_batch, resume_from, engine)
    return resume_from, state


def apply_optim_settings(optimizer, scheduler, cfg) -> list[str]:
    """A resumed run trains with the recipe's optimizer settings, not the checkpoint's: returns what changed."""
    notes = []
    old_lr = scheduler.base_lrs[0]
    if old_lr != cfg.lr:
        notes.append(f"optim.lr {old_lr:g} -> {cfg.lr:g}")
    scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for i, group in enumerate(optimizer.param_groups):
        wd = cfg.weight_decay if i == 0 else 0.0  # param_groups(): matrices first, then norms and biases
        for key, value in (("betas", tuple(cfg.betas)), ("eps", cfg.eps), ("weight_decay", wd)):
            current = tuple(group[key]) if key == "betas" else group[key]
            if current != value and i == 0:
                notes.append(f"optim.{key} {current} -> {value}")
            group[key] = value
        group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * factor
    return notes


class StopRequest:
    """Ctrl-C during training asks to stop at the end of the current step (a second Ctrl-C stops at
    once). Installed only in the main thread; elsewhere it never fires."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        import signal

        if self.requested:  # the second Ctrl-C: do not wait for the step
            signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: training stopped at a step boundary; the message says what was saved."""


def apply_update(accelerator, model, optimizer, scheduler, loss: float, grad_clip: float) -> tuple[str, float]:
    """Clip, check and apply one optimizer update, before anything of a bad step reaches the weights.

    Returns ``("applied", grad_norm)``; ``("overflow", inf)`` when an fp16 GradScaler found inf/NaN
    gradients (it skips the update and lowers its scale: not divergence); ``("loss" | "gradient
    norm", grad_norm)`` when that value is not finite and nothing was applied.
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = float("nan") if norm is None else float(norm)  # None: the engine (DeepSpeed) clips itself
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return "loss", grad_norm
    if norm is not None and not math.isfinite(grad_norm):
        if accelerator.scaler is None:
            optimizer.zero_grad(set_to_none=True)
            return "gradient norm", grad_norm
        optimizer.step()  # the scaler sees the inf, skips the update and lowers its scale
        optimizer.zero_grad(set_to_none=True)
        return "overflow", grad_norm
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return "applied", grad_norm


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def rank_rows(micro: int, accum_index: int, world: int, rank: int) -> slice:
    start = (accum_index * world + rank) * micro
    return slice(start, start + micro)


@torch.no_grad()
def evaluate(
    model, objective: Objective, val_rows: dict[str, torch.Tensor], batch_size: int, seed: int, accelerator: Accelerator
) -> float:
    """``exp(Σ total / Σ count)`` over the validation rows with fixed noise: the NELBO
    perplexity bound for diffusion objectives, the perplexity for AR."""
    was_training = model.training
    model.eval()
    n, length = val_rows["input_ids"].shape
    noise = objective.sample_noise((n, length), torch.Generator().manual_seed(seed + 7919), for_eval=True)
    shard = range(accelerator.process_index, n, accelerator.num_processes)
    idx = torch.tensor(list(shard), dtype=torch.long)
    total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    # every process runs the same number of forwards (a sharded engine's forward is collective):
    # a process out of rows runs row 0 and discards it
    per_process = math.ceil(n / accelerator.num_processes)
    batches = math.ceil(per_process / batch_size)
    for b in range(batches):
        rows = idx[b * batch_size : (b + 1) * batch_size]
        real = len(rows) > 0
        rows = rows if real else torch.zeros(1, dtype=torch.long)
        batch = {k: v[rows].to(accelerator.device) for k, v in val_rows.items()}
        with accelerator.autocast():
            out = objective.loss(model, batch, {k: v[rows] for k, v in noise.items()})
        if real:
            total += out.total.double()
            count += out.count.double()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return math.exp(total.item() / count.item())


def _trackers(names: list[str]) -> list[str]:
    if names != ["auto"]:
        return [n for n in names if n != "auto"]
    try:
        import tensorboard  # noqa: F401

        return ["tensorboard"]
    except ImportError:
        return []


def trim_log(path: Path, step: int) -> None:
    """On resume, drop log records written after the checkpoint's step."""
    if not path.is_file():
        return
    with open(path) as fh:
        keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as fh:
        fh.writelines(keep)


def main(cfg: RecipeConfig) -> TrainResult:
    """Train from a recipe. ``accelerate launch -m dlm.train RECIPE.yaml key=value ...``"""
    t0 = time.time()
    out = Path(cfg.train.output_dir)
    # torchrun / accelerate launch on a machine without CUDA: run the processes as gloo CPU ranks
    accelerator = make_accelerator(  # DDP, FSDP2 or DeepSpeed: whatever the accelerate config says
        mixed_precision=cfg.train.mixed_precision,
        log_with=_trackers(list(cfg.train.trackers)) or None,
        project_dir=str(out),
        # accumulation through accelerate: gradients sync (and DeepSpeed steps) once per global batch
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False
        ),
    )
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    lock = RunLock(out) if accelerator.is_main_process else None
    if lock is not None:
        lock.acquire()  # one run per output_dir; also fails at once on a read-only directory
    try:
        return _train(cfg, accelerator, out, t0)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Run:
    """What one training run holds while it runs: the prepared model and optimiser, the data, the
    objective, and where it logs and checkpoints."""

    cfg: RecipeConfig
    accelerator: Accelerator
    out: Path
    data: DataBundle
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    global_batch: int
    last_good: Path | None = None  # the newest checkpoint written (or resumed from)
    val_ppl: float | None = None

    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    @property
    def tok(self):
        return self.data.tokenizer

    def write_log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def validate(self, step: int) -> float:
        """The validation bound (with the EMA weights swapped in when there are some), logged."""
        model = self.accelerator.unwrap_model(self.model)
        with self.ema.swapped_in(model) if self.ema is not None else nullcontext():
            self.val_ppl = evaluate(
                self.model,
                self.objective,
                self.data.val,
                self.cfg.train.eval_batch_size,
                self.cfg.seed,
                self.accelerator,
            )
        self.write_log({"step": step, "val_ppl": self.val_ppl, "bound": self.objective.bound})
        return self.val_ppl

    def save(self, step: int) -> Path:
        state = {
            "objective": self.objective.name,
            "seed": self.cfg.seed,
            "global_batch": self.global_batch,
            "data_position": step,
            "identity": identity(self.cfg, self.global_batch, engine_name(self.accelerator)),
            "val_ppl": self.val_ppl,
        }
        self.last_good = save_checkpoint(
            self.accelerator, self.out, step, self.model, self.tok, self.optimizer, self.scheduler, self.ema,
            state, self.cfg.train.keep_checkpoints,
        )  # fmt: skip
        return self.last_good


def _train(cfg: RecipeConfig, accelerator: Accelerator, out: Path, t0: float) -> TrainResult:
    """Setup (data, model, optimiser, resume) → the step loop → export."""
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * accelerator.num_processes
    sharded = engine_name(accelerator) if is_sharded(accelerator) else None
    expected = expected_files(cfg.train.ema_decay > 0, sharded=sharded, world=accelerator.num_processes)
    resume_from, resumed_state = open_resume(accelerator, cfg, out, expected, global_batch)
    if resume_from is not None and resumed_state["step"] == cfg.train.max_steps:
        accelerator.print(
            f"dlm train | {out} is already trained to step {resumed_state['step']} = train.max_steps "
            f"(model: {out / 'final'}); raise train.max_steps to continue it"
        )
        bound = "perplexity" if resumed_state.get("objective") == "ar" else "nelbo"
        return TrainResult(out, resumed_state["step"], resumed_state.get("val_ppl"), bound, None, time.time() - t0)
    set_seed(cfg.seed)
    data = _load_data(cfg, accelerator, out, resume_from)
    model, objective = _build_model_and_objective(cfg, data.tokenizer)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # built after prepare: the shadow lives where the (possibly sharded) parameters now are
    ema = EMA(accelerator.unwrap_model(model), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    run = Run(cfg, accelerator, out, data, model, objective, optimizer, scheduler, ema, global_batch)
    start_step = _resume_or_start(run, resume_from)
    _announce(run)
    losses = _loop(run, start_step)
    final_step = max(cfg.train.max_steps, start_step)
    if run.val_ppl is None:  # resumed at or past max_steps: nothing ran
        run.validate(final_step)
    samples, unwrapped = _export(run)
    wall = time.time() - t0
    accelerator.print(
        f"done in {wall:.0f}s | validation {bound_label(objective.bound)} {run.val_ppl:.2f} | unigram perplexity "
        f"{data.stats.get('unigram_ppl', float('nan')):.2f} | model: {out / 'final'}"
    )
    return TrainResult(
        out, final_step, run.val_ppl, objective.bound, data.stats.get("unigram_ppl"), wall, losses, samples, unwrapped
    )


def _load_data(cfg: RecipeConfig, accelerator: Accelerator, out: Path, resume_from: Path | None) -> DataBundle:
    """Rows and tokenizer: the main process trains (or loads) the tokenizer, the others reuse it."""
    tok_dir = out / "tokenizer"
    with accelerator.main_process_first():
        # model.init_from of another family is converted once, by the main process first (others reuse it)
        init_dir = init_checkpoint(cfg.model.init_from) if cfg.model.init_from is not None else None
        tokenizer = None
        if resume_from is not None:
            tokenizer = AutoTokenizer.from_pretrained(resume_from)
        elif init_dir is not None and cfg.tokenizer.name_or_path is None:
            tokenizer = AutoTokenizer.from_pretrained(init_dir)  # the starting model's own
        elif not accelerator.is_main_process:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        data = build_data(cfg.data, cfg.tokenizer, cfg.seed, tokenizer=tokenizer)
        if accelerator.is_main_process and resume_from is None:
            data.tokenizer.save_pretrained(tok_dir)
    return data


def _build_model_and_objective(cfg: RecipeConfig, tok) -> tuple[torch.nn.Module, Objective]:
    """The model (configured to decode with the attention its objective trains) and the objective."""
    model = build_model(
        cfg.model, len(tok), tok.mask_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    if cfg.data.seq_len > model.config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}; lower data.seq_len or use a longer-context model"
        )
    d = cfg.diffusion
    objective = build_objective(
        cfg.objective, mask_token_id=tok.mask_token_id, schedule=d.schedule, schedule_args=dict(d.schedule_args),
        t_eps=d.t_eps, antithetic=d.antithetic, block_size=d.block_size, clip_low=d.clip_low, clip_high=d.clip_high,
    )  # fmt: skip
    mode, block = getattr(objective, "attention", ("bidirectional", None))
    if model.config.attention_mode == "causal" and mode != "causal" and not model.config.logits_shift:
        # A2D: an AR checkpoint's head predicts token i + 1 from hidden state i; the adapted model keeps that
        model.config.logits_shift = True
    model.config.attention_mode, model.config.block_size = mode, block
    return model, objective


def _resume_or_start(run: Run, resume_from: Path | None) -> int:
    """The step to start from: a checkpoint's (its state loaded, the log trimmed to it), or 0."""
    acc = run.accelerator
    if resume_from is None:
        if acc.is_main_process and run.log_path.exists():
            run.log_path.unlink()
        return 0
    state = load_checkpoint(acc, resume_from, run.model, run.optimizer, run.scheduler, run.ema)
    run.last_good = resume_from
    changed = apply_optim_settings(run.optimizer, run.scheduler, run.cfg.optim)
    if acc.is_main_process:
        trim_log(run.log_path, state["step"])
    acc.print(
        f"dlm train | resumed from {resume_from} at step {state['step']}"
        + (f" ({', '.join(changed)})" if changed else "")
    )
    return state["step"]


def _announce(run: Run) -> None:
    cfg, acc, stats = run.cfg, run.accelerator, run.data.stats
    acc.init_trackers("dlm", config={k: str(v) for k, v in to_dict(cfg).items()})
    n_params = sum(p.numel() for p in acc.unwrap_model(run.model).parameters())
    acc.print(
        f"dlm train | objective={run.objective.name} params={n_params / 1e6:.2f}M vocab={len(run.tok)} "
        f"seq_len={cfg.data.seq_len} global_batch={run.global_batch} ({acc.num_processes} process(es) x "
        f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} accum) "
        f"train_rows={int(stats.get('train_rows', 0)) or 'streamed'} "
        f"unigram_ppl={stats.get('unigram_ppl', float('nan')):.2f}"
        + (" tokens=cached" if stats.get("tokens_from_cache") else "")
    )


def _step_loss(run: Run, step: int) -> float:
    """Forward and backward of global batch ``step`` (this process's rows, in micro-batches): the
    mean loss over the whole global batch, reduced across processes."""
    cfg, acc = run.cfg, run.accelerator
    micro, world = cfg.train.micro_batch_size, acc.num_processes
    batch_global = run.data.train.global_batch(step, run.global_batch)
    noise_global = run.objective.sample_noise((run.global_batch, cfg.data.seq_len), step_generator(cfg.seed, step))
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    for a in range(cfg.train.grad_accum):
        rows = rank_rows(micro, a, world, acc.process_index)
        batch = {k: v[rows].to(acc.device) for k, v in batch_global.items()}
        noise = {k: v[rows] for k, v in noise_global.items()}
        with acc.accumulate(run.model), acc.autocast():
            res = run.objective.loss(run.model, batch, noise)
            acc.backward(res.total / res.count)  # accelerate divides by grad_accum
        total += res.total.detach().double()
        count += res.count.detach().double()
    return (acc.reduce(total, "sum") / acc.reduce(count, "sum")).item()


def _diverged(run: Run, outcome: str, loss: float, grad_norm: float, step: int) -> TrainingDivergedError:
    last = run.last_good
    keep = (
        f"the last good checkpoint is {last} (step {int(str(last).rsplit('-', 1)[-1])})"
        if last
        else ("no checkpoint had been written yet")
    )
    return TrainingDivergedError(
        f"{outcome} became {loss if outcome == 'loss' else grad_norm} at step {step + 1}; training "
        f"stopped before applying that update, and {keep}. Lower optim.lr, raise optim.warmup_steps or use "
        "train.mixed_precision=no, then resume (train.resume=auto)."
    )


def _loop(run: Run, start_step: int) -> list[float]:
    """Steps ``start_step .. max_steps``: update, log, validate, checkpoint; a stop request (Ctrl-C,
    SIGTERM) on any process saves and stops every process at the same step. Returns the losses."""
    cfg, acc = run.cfg, run.accelerator
    run.model.train()
    losses: list[float] = []
    bar = tqdm(
        total=cfg.train.max_steps, initial=start_step, disable=not acc.is_main_process,
        desc=f"train {run.objective.name}", dynamic_ncols=True,
    )  # fmt: skip
    tick, last_logged, overflows = time.time(), start_step, 0  # overflows: fp16 steps the GradScaler skipped
    with StopRequest() as stop:
        for step in range(start_step, cfg.train.max_steps):
            loss = _step_loss(run, step)
            outcome, grad_norm = apply_update(acc, run.model, run.optimizer, run.scheduler, loss, cfg.optim.grad_clip)
            if outcome not in ("applied", "overflow"):
                bar.close()
                acc.end_training()
                raise _diverged(run, outcome, loss, grad_norm, step)
            overflows += outcome == "overflow"
            if run.ema is not None:
                run.ema.update(acc.unwrap_model(run.model))
            losses.append(loss)
            done, last = step + 1, step + 1 == cfg.train.max_steps
            bar.update(1)
            if done % cfg.train.log_every == 0 or last:
                elapsed, steps_run, last_logged = max(time.time() - tick, 1e-9), done - last_logged, done
                mean = sum(losses[-steps_run:]) / steps_run  # the mean over the logging window: a readable curve
                lr = run.scheduler.get_last_lr()[0]
                tokens_per_s = steps_run * run.global_batch * cfg.data.seq_len / elapsed
                extra = {"overflow_steps": overflows} if overflows else {}
                run.write_log(
                    {
                        "step": done,
                        "loss": mean,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        **extra,
                    }
                )
                bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.2e}")
                tick = time.time()
            if done % cfg.train.eval_every == 0 or last:
                bar.write(f"step {done}: validation {bound_label(run.objective.bound)} {run.validate(done):.2f}")
            if done % cfg.train.save_every == 0 or last:
                run.save(done)
            if stop.requested or acc.num_processes > 1:  # every process stops at the same step
                if float(acc.reduce(torch.tensor(float(stop.requested), device=acc.device), "sum")) > 0:
                    bar.close()
                    if run.last_good is None or run.last_good.name != f"checkpoint-{done}":
                        run.save(done)
                    acc.end_training()
                    raise TrainingInterrupted(
                        f"interrupted after step {done}: saved {run.last_good}; run the same command to continue"
                    )
    bar.close()
    return losses


def _export(run: Run) -> tuple[list[str], torch.nn.Module]:
    """The (EMA) model and tokenizer in ``final/``, atomically, then the curves and a few samples."""
    cfg, acc = run.cfg, run.accelerator
    unwrapped = acc.unwrap_model(run.model)
    export_final(run.out / "final", run.model, run.tok, run.ema, acc)  # a sharded engine gathers on every process
    if acc.is_main_process and cfg.train.plot and run.log_path.is_file():
        from dlm.train.plot import plot_curves

        plot_curves(run.log_path, run.out / "curves.png", title=f"{run.objective.name} · {cfg.train.output_dir}")
    samples: list[str] = []
    if cfg.sample.num_samples > 0 and (acc.is_main_process or is_sharded(acc)):
        samples = _samples(unwrapped, run.tok, cfg, run.objective.name, run.ema)  # sharded: every process decodes alike
        for i, text in enumerate(samples):
            acc.print(f"--- sample {i + 1} ---\n{text}")
    acc.wait_for_everyone()
    acc.end_training()
    return samples, unwrapped


def _samples(model, tok, cfg: RecipeConfig, objective: str, ema) -> list[str]:
    from dlm.decode.ancestral import AncestralDecoder
    from dlm.decode.autoregressive import AutoregressiveDecoder

    model.eval()
    prompt = tok(cfg.sample.prompt, add_special_tokens=False)["input_ids"] if cfg.sample.prompt else []
    prompt_ids = torch.tensor([prompt] * cfg.sample.num_samples, dtype=torch.long).reshape(cfg.sample.num_samples, -1)
    gen = torch.Generator().manual_seed(cfg.seed)
    if objective == "ar":
        decoder = AutoregressiveDecoder(gen_length=cfg.sample.gen_length, temperature=cfg.sample.temperature)
    else:  # block-causal (BD3-LM) models decode block by block, whole blocks only
        block = model.config.block_size if model.config.attention_mode == "block_causal" else None
        gen_length = -(-cfg.sample.gen_length // block) * block if block else cfg.sample.gen_length
        steps = max(cfg.sample.steps, gen_length // block if block else 1)
        decoder = AncestralDecoder(
            gen_length=gen_length, steps=steps, block_length=block, temperature=cfg.sample.temperature
        )
    device = next(model.parameters()).device
    with torch.no_grad(), ema.swapped_in(model) if ema is not None else nullcontext():
        result = decoder(model, prompt_ids.to(device), generator=gen)
    model.train()
    return tok.batch_decode(result.tokens, skip_special_tokens=False)
