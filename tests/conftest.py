"""Shared fixtures: tiny models and corpora built locally (nothing downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import dlm.model  # noqa: F401  (registers the Auto classes)
from dlm.config import from_dict
from dlm.model import DLMConfig, DLMModel
from dlm.train.config import RecipeConfig

WORDS = (
    "the model masks tokens and learns to fill them in from context while diffusion runs backwards "
    "over time steps until every position holds a token def return import class for while if else"
).split()


def tiny_config(**kw) -> DLMConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        mask_token_id=63,
    )
    base.update(kw)
    return DLMConfig(**base)


def tiny_model(seed: int = 0, **kw) -> DLMModel:
    torch.manual_seed(seed)
    return DLMModel(tiny_config(**kw)).eval()


def write_corpus(root: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) for _ in range(rng.randint(4, 10))]
        (root / f"doc_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_recipe(tmp_path: Path, **sections) -> RecipeConfig:
    """A recipe that trains in seconds on a generated corpus."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    data = {
        "seed": 0,
        "objective": "mdlm",
        "model": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        },
        "tokenizer": {"vocab_size": 300},
        "data": {"dataset": str(corpus), "file_glob": "*.txt", "seq_len": 32, "val_fraction": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "micro_batch_size": 4,
            "eval_every": 3,
            "save_every": 3,
            "log_every": 1,
            "eval_batch_size": 8,
            "trackers": [],
            "plot": True,
        },
        "sample": {"num_samples": 1, "gen_length": 8, "steps": 4},
    }
    for name, value in sections.items():
        if isinstance(value, dict):
            data[name] = {**data.get(name, {}), **value}
        else:
            data[name] = value
    return from_dict(RecipeConfig, data)


@pytest.fixture
def model() -> DLMModel:
    return tiny_model()


#: SFT data of the copy task (4 letters × 2) that the RL, guide and bench tests train on
REPEAT_SFT = {
    "dataset": "task:repeat",
    "format": "chat",
    "task_args": {"period": 4, "repeats": 2},
    "max_documents": 64,
    "seq_len": 16,
    "val_fraction": 0.1,
}


def train_tiny(tmp_path: Path, **sections) -> str:
    """Train a tiny recipe through ``dlm train`` (3 steps unless told) and return its output_dir."""
    import dataclasses

    import yaml

    from dlm.cli import main as cli_main

    sections.setdefault("sample", {"num_samples": 0})
    sections.setdefault("train", {"max_steps": 3, "save_every": 3, "eval_every": 3})
    cfg = tiny_recipe(tmp_path, **sections)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert cli_main(["train", str(recipe)]) == 0
    return cfg.train.output_dir


def exit_after_save(loop_module) -> None:
    """``DLM_TEST_EXIT_AFTER_SAVE=N`` (for the dist_*.py scripts): every process exits once the
    loop's checkpoint N is complete, as a run killed there would."""
    import os

    exit_after = os.environ.get("DLM_TEST_EXIT_AFTER_SAVE")
    if exit_after is None:
        return
    real_save = loop_module.save_checkpoint

    def save_then_exit(accelerator, out, step, *args):
        path = real_save(accelerator, out, step, *args)
        if step == int(exit_after):
            os._exit(0)
        return path

    loop_module.save_checkpoint = save_then_exit


def run_script(script: str, *args: str, processes: int = 1, env: dict | None = None, check: bool = True):
    """Run ``tests/<script>`` with ``args``: plainly, or under torchrun with ``processes`` gloo ranks
    (one thread each, the repository importable, ``env`` added), failing the test if it fails
    (unless ``check`` is False: then the completed process is returned)."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tests.parent), **(env or {})}
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    return subprocess.run(
        [*launch, str(tests / script), *map(str, args)], check=check, env=env, timeout=600,
        capture_output=not check, text=True,
    )  # fmt: skip
