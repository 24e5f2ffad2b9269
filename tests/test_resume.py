"""A run directory that cannot be corrupted: refusals leave every file as it was, faults end in a
known state, and resumed runs continue exactly."""

import dataclasses
import hashlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from dlm.cli import main as cli_main
from dlm.config import ConfigError
from dlm.train import loop
from dlm.train.checkpoint import list_checkpoints
from dlm.train.loop import TrainingInterrupted, main
from dlm.train.rundir import RunLock


def recipe(tmp_path, **train):
    return tiny_recipe(
        tmp_path, sample={"num_samples": 0}, train={"max_steps": 4, "save_every": 2, "eval_every": 2, **train}
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the lock aside) and a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def with_(cfg, section: str, **fields):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4) and the losses it trained with."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = recipe(tmp)
    result = main(cfg)
    return cfg, result


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda c: dataclasses.replace(c, objective="ar"), "objective: 'mdlm' → 'ar'"),
        (lambda c: with_(c, "model", hidden_size=64), "model.hidden_size: 32 → 64"),
        (lambda c: dataclasses.replace(c, seed=1), "seed: 0 → 1"),
        (lambda c: with_(c, "data", seq_len=16), "data.seq_len: 32 → 16"),
        (lambda c: with_(c, "train", micro_batch_size=2), "global_batch: 4 → 2"),
    ],
)
def test_another_recipe_into_the_same_directory_is_refused_and_changes_nothing(finished, change, named):
    cfg, _ = finished
    before = snapshot(Path(cfg.train.output_dir))
    with pytest.raises(ConfigError, match="holds a run of another recipe") as err:
        main(with_(change(cfg), "train", max_steps=8))
    assert named in str(err.value) and "Choose another train.output_dir" in str(err.value)
    assert snapshot(Path(cfg.train.output_dir)) == before


def test_a_finished_run_is_not_trained_or_rewritten_again(finished, capsys):
    cfg, first = finished
    before = snapshot(Path(cfg.train.output_dir))
    again = main(cfg)
    assert "already trained to step 4 = train.max_steps" in capsys.readouterr().out
    assert again.final_step == 4 and again.losses == [] and again.val_ppl == pytest.approx(first.val_ppl)
    assert snapshot(Path(cfg.train.output_dir)) == before  # no second final record, final/ untouched


def test_max_steps_below_the_checkpoint_is_refused(finished):
    cfg, _ = finished
    before = snapshot(Path(cfg.train.output_dir))
    with pytest.raises(ConfigError, match="is at step 4, past train.max_steps=3; raise train.max_steps"):
        main(with_(cfg, "train", max_steps=3))
    assert snapshot(Path(cfg.train.output_dir)) == before


def test_a_second_run_while_one_holds_the_directory_is_refused(tmp_path):
    cfg = recipe(tmp_path)
    holder = RunLock(Path(cfg.train.output_dir))
    holder.acquire()
    try:
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on .*\); wait for it"):
            main(cfg)
        assert not any(Path(cfg.train.output_dir).glob("checkpoint-*"))
    finally:
        holder.release()
    assert main(cfg).final_step == 4  # free again once the holder is gone


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path):
    cfg = recipe(tmp_path)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True)
    (out / ".lock").write_text("pid 999999 on gone\n")  # the file stays, the kernel lock died with its holder
    assert main(cfg).final_step == 4


def straight_losses(tmp_path) -> list[float]:
    return main(recipe(tmp_path / "straight", max_steps=6)).losses


@pytest.mark.parametrize(
    "damage",
    [
        "truncate_weights",
        "drop_optimizer",
        "garble_optimizer",
        "truncate_ema",
    ],
)
def test_a_newest_checkpoint_that_does_not_load_is_kept_aside_and_the_previous_one_resumes(tmp_path, damage, caplog):
    ema = damage == "truncate_ema"
    cfg = recipe(tmp_path, max_steps=4, ema_decay=0.9 if ema else 0.0)
    main(cfg)
    out = Path(cfg.train.output_dir)
    newest = out / "checkpoint-4"
    if damage == "truncate_weights":
        w = newest / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "drop_optimizer":
        (newest / "optimizer.pt").unlink()
    elif damage == "garble_optimizer":
        opt = newest / "optimizer.pt"
        data = bytearray(opt.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
        opt.write_bytes(bytes(data))
    else:
        e = newest / "ema.safetensors"
        e.write_bytes(e.read_bytes()[:-8])
    broken = snapshot(newest)
    resumed = main(with_(cfg, "train", max_steps=6))
    assert "checkpoint-4 cannot be resumed from" in caplog.text
    assert snapshot(out / "broken-checkpoint-4") == broken  # kept, byte for byte
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    reference = main(recipe(tmp_path / "straight", max_steps=6, ema_decay=0.9 if ema else 0.0)).losses
    assert resumed.losses == reference[2:]  # steps 3..6 from checkpoint-2, as an uninterrupted run


def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, capsys):
    cfg = recipe(tmp_path)
    main(cfg)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    newest = Path(cfg.train.output_dir) / "checkpoint-4"
    torch.save({"state": {}, "param_groups": [Payload()]}, newest / "optimizer.pt")
    with pytest.raises(ConfigError, match="optimizer.pt holds objects other than tensors"):
        main(with_(cfg, "train", max_steps=6))
    assert not marker.exists()


def test_a_changed_learning_rate_applies_on_resume(tmp_path, capsys):
    cfg = recipe(tmp_path, max_steps=4)
    main(cfg)
    lowered = dataclasses.replace(with_(cfg, "train", max_steps=6), optim=dataclasses.replace(cfg.optim, lr=1e-3))
    main(lowered)
    assert "optim.lr 0.003 -> 0.001" in capsys.readouterr().out
    log = [json.loads(line) for line in (Path(cfg.train.output_dir) / "log.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in log if "lr" in r}
    factor = loop.warmup_cosine(cfg.optim.warmup_steps, 6, cfg.optim.min_lr_ratio)
    assert lr[5] == pytest.approx(1e-3 * factor(5)) and lr[6] == pytest.approx(1e-3 * factor(6))


def test_ctrl_c_stops_at_a_step_boundary_saves_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = recipe(tmp_path, max_steps=6, save_every=100)
    real = loop.step_generator

    def interrupt_at_step_3(seed, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during step 4's work; the step still completes
        return real(seed, step)

    monkeypatch.setattr(loop, "step_generator", interrupt_at_step_3)
    with pytest.raises(TrainingInterrupted, match=r"interrupted after step 4: saved .*checkpoint-4; run the same"):
        main(cfg)
    monkeypatch.setattr(loop, "step_generator", real)
    assert [p.name for p in list_checkpoints(Path(cfg.train.output_dir))] == ["checkpoint-4"]
    resumed = main(cfg)
    assert resumed.losses == straight_losses(tmp_path)[4:]


def test_command_line_faults_end_in_one_line(tmp_path, capsys):
    import yaml

    cfg = recipe(tmp_path)
    path = tmp_path / "recipe.yaml"
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")  # nothing can be created under it, not even by root
    path.write_text(yaml.safe_dump(dataclasses.asdict(with_(cfg, "train", output_dir=str(blocked / "run")))))
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to train.output_dir" in err and "choose a writable" in err
    diverge = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e30, grad_clip=0.0))
    path.write_text(yaml.safe_dump(dataclasses.asdict(diverge)))
    assert cli_main(["train", str(path)]) == 1
    err = capsys.readouterr().err  # progress bars, then the one-line error: no traceback
    last = err.strip().splitlines()[-1]
    assert last.startswith("dlm train: error: ") and " became " in last and "Traceback" not in err


class FakeAccelerator:
    def __init__(self, norm: float, scaler: bool):
        self.norm, self.scaler, self.optimizer_step_was_skipped = norm, object() if scaler else None, False

    def clip_grad_norm_(self, params, max_norm):
        return torch.tensor(self.norm)


class Counter:
    def __init__(self, accelerator=None):
        self.accelerator, self.steps, self.zeroed = accelerator, 0, 0

    def step(self):
        self.steps += 1
        if self.accelerator is not None and self.accelerator.scaler is not None:
            self.accelerator.optimizer_step_was_skipped = not math.isfinite(self.accelerator.norm)

    def zero_grad(self, set_to_none=True):
        self.zeroed += 1


@pytest.mark.parametrize(
    "loss, norm, scaler, outcome, opt_steps, sched_steps",
    [
        (1.0, 2.0, False, "applied", 1, 1),
        (1.0, 2.0, True, "applied", 1, 1),
        (1.0, float("inf"), True, "overflow", 1, 0),  # fp16: the scaler skips the update, no divergence
        (1.0, float("inf"), False, "gradient norm", 0, 0),  # fp32/bf16: nothing applied, stop
        (float("nan"), 2.0, True, "loss", 0, 0),
    ],
)
def test_an_update_is_applied_skipped_as_an_fp16_overflow_or_refused(
    loss, norm, scaler, outcome, opt_steps, sched_steps
):
    acc = FakeAccelerator(norm, scaler)
    opt, sched = Counter(acc), Counter()
    got, grad_norm = loop.apply_update(acc, torch.nn.Linear(2, 2), opt, sched, loss, 1.0)
    assert got == outcome and (opt.steps, sched.steps, opt.zeroed) == (opt_steps, sched_steps, 1)
    assert grad_norm == norm or (math.isnan(grad_norm) and math.isnan(norm))


def test_checkpoints_with_sharded_weights_are_checked_and_loaded(tmp_path):
    """Weights saved in shards with an index (large models) resume like a single file; a shard
    that went missing makes the checkpoint unusable, named."""
    from safetensors.torch import load_file, save_file

    from dlm.train.checkpoint import expected_files, load_weights
    from dlm.train.rundir import checkpoint_problem

    cfg = recipe(tmp_path)
    main(cfg)
    newest = Path(cfg.train.output_dir) / "checkpoint-4"
    whole = load_file(newest / "model.safetensors")
    names = sorted(whole)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in parts.items():
        save_file({k: whole[k] for k in keys}, newest / shard)
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    (newest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (newest / "model.safetensors").unlink()
    assert checkpoint_problem(newest, expected_files(False)) is None
    assert all(torch.equal(load_weights(newest)[k], whole[k]) for k in whole)
    second = newest / "model-00002-of-00002.safetensors"
    second.rename(tmp_path / "aside")
    assert checkpoint_problem(newest, expected_files(False)) == (
        "model-00002-of-00002.safetensors (named by model.safetensors.index.json) is missing"
    )
    (tmp_path / "aside").rename(second)
    assert main(with_(cfg, "train", max_steps=6)).final_step == 6  # resumed from the sharded checkpoint
