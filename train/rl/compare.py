"""``dlm rl-compare RUN [RUN ...]``: held-out reward of several RL runs, grouped, as one table and
one PNG.

Runs are grouped by their directory name with a trailing ``-seed<N>`` removed (``runs/cmp/
coupled-seed0``, ``.../coupled-seed1`` → ``coupled``), so seeds of one setting form one curve: the
mean held-out reward per step with a band from the lowest to the highest seed. The table gives
each group's start, final mean ± standard deviation over seeds, the per-seed finals and the mean
wall time (from ``run.json``, written when a run finishes).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from dlm.utils import pyplot, save_figure


def load_run(path: Path) -> dict:
    log = path / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{path} has no log.jsonl: is it a dlm rl output_dir?")
    held = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if "held_out_reward" in rec:
            held[rec["step"]] = rec["held_out_reward"]
    summary = path / "run.json"
    wall = json.loads(summary.read_text()).get("wall_seconds") if summary.is_file() else None
    return {"name": path.name, "held": held, "wall": wall, "finished": summary.is_file()}


def group_name(run_dir: Path) -> str:
    return re.sub(r"-seed\d+$", "", run_dir.name)


def compare(runs: list[Path]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for path in runs:
        groups.setdefault(group_name(path), []).append(load_run(path))
    return groups


def table(groups: dict[str, list[dict]]) -> str:
    rows = [
        "| run | seeds | held-out start | final (mean ± std) | per seed | wall (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in groups.items():
        finals = [r["held"][max(r["held"])] for r in runs]
        start = statistics.mean(r["held"][min(r["held"])] for r in runs)
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        walls = [r["wall"] for r in runs if r["wall"] is not None]
        wall = f"{statistics.mean(walls):.0f} s" if walls else "—"
        per_seed = " / ".join(f"{f:.3f}" + ("" if r["finished"] else "*") for f, r in zip(finals, runs))
        final = f"{statistics.mean(finals):.3f} ± {spread:.3f}"
        rows.append(f"| {name} | {len(runs)} | {start:.3f} | {final} | {per_seed} | {wall} |")
    if any(not r["finished"] for runs in groups.values() for r in runs):
        rows.append(
            "\n\\* no run.json: a run still going, or one from before dlm rl wrote run.json "
            "(its last held-out value is shown)"
        )
    return "\n".join(rows)


def plot(groups: dict[str, list[dict]], png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in groups.items():
        steps = sorted(set.intersection(*(set(r["held"]) for r in runs)))
        values = [[r["held"][s] for r in runs] for s in steps]
        mean = [statistics.mean(v) for v in values]
        line = ax.plot(steps, mean, "o-", label=f"{name} (n={len(runs)})")[0]
        if len(runs) > 1:
            ax.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15
            )
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out reward (greedy)")
    ax.set_title("mean over seeds; band = min..max")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)


def main(runs: list[str], out: str | None) -> str:
    paths = [Path(r) for r in runs]
    groups = compare(paths)
    text = table(groups)
    if out:
        plot(groups, Path(out))
    return text
