"""Training curves as a PNG: training loss and the validation bound against steps."""

from __future__ import annotations

import json
from pathlib import Path

from dlm.utils import pyplot, save_figure


def read_log(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(log_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    plt = pyplot()
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_ppl"]) for r in records if "val_ppl" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot(*zip(*train), lw=1)
    ax1.set(xlabel="step", ylabel="training loss (per token)", title="training loss")
    bound = next((r.get("bound") for r in records if "val_ppl" in r), "nelbo")
    what = "NELBO perplexity bound" if bound == "nelbo" else "perplexity"
    if val:
        ax2.plot(*zip(*val), marker="o", lw=1)
        ax2.set_yscale("log")
        last_step, last = val[-1]
        ax2.annotate(f"{last:.2f}", (last_step, last), xytext=(-4, 8), textcoords="offset points", ha="right")
        what += f" — final {last:.2f} at step {last_step}"
    ax2.set(
        xlabel="step", ylabel="perplexity" + (" upper bound" if bound == "nelbo" else ""), title=f"validation {what}"
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, png_path, dpi=110)
