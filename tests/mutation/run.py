"""Mutation score of dlm's core math with cosmic-ray (``pip install -e ".[mutation]"``).

    python tests/mutation/run.py                       # every module below (hours on 2 cores)
    python tests/mutation/run.py train/ema.py dlm/model/masks.py

Each module is mutated in place, one mutant at a time, and only the tests that cover it run
against each mutant (``-x``, a per-mutant timeout), so a module takes minutes rather than a full
suite per mutant. Sessions live in ``$DLM_MUTATION_DIR`` (default ``/tmp/dlm-mutation``) and resume
where they stopped; ``summary.json`` / ``summary.md`` there hold the score per module and every
surviving mutant's diff. cosmic-ray restores each file after its mutant; check ``git status`` if a run
was killed. Surviving mutants are either killed by a new test or listed, with the reason they are
equivalent, in ``docs`` of the issue that ran them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTEST = "python -m pytest -x -q -p no:cacheprovider"

#: module -> the tests that cover it (slow statistical tests left out where a faster one covers the same code)
MODULES: dict[str, str] = {
    "dlm/schedules.py": "tests/test_schedules.py tests/test_objectives.py",
    "dlm/model/masks.py": "tests/test_model.py tests/test_bd3lm.py tests/test_cache.py",
    "train/objectives/mdlm.py": "tests/test_objectives.py",
    "train/objectives/exact_count.py": "tests/test_objectives.py",
    "train/objectives/sft.py": "tests/test_objectives.py",
    "train/objectives/ar.py": "tests/test_objectives.py tests/test_bd3lm.py",
    "train/objectives/bd3lm.py": "tests/test_bd3lm.py",
    "decode/sampling.py": "tests/test_decode.py tests/test_decoders.py -k 'not float64'",
    "decode/first_hitting.py": "tests/test_decoders.py -k 'not float64'",
    "decode/confidence.py": "tests/test_decoders.py tests/test_generate_cli.py -k 'not float64'",
    "decode/caches.py": "tests/test_cache.py",
    "train/rl/estimators.py": "tests/test_rl.py",
    "train/rl/loss.py": "tests/test_rl.py tests/test_rl_loop.py -k 'norm or loss or gradient or clip'",
    "train/ema.py": "tests/test_ema.py",
}


def run_module(module: str, tests: str, work: Path, timeout: float = 120.0) -> dict:
    """Init (once), execute the pending mutants and return the module's counts and survivors.
    cosmic-ray runs the test command from the repository root (the working directory of ``exec``)."""
    session = work / (module.replace("/", "_").removesuffix(".py") + ".sqlite")
    config = session.with_suffix(".toml")
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{ROOT / module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{PYTEST} {tests}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    if not session.exists():
        subprocess.run(["cosmic-ray", "init", str(config), str(session)], check=True, cwd=ROOT)
    subprocess.run(["cosmic-ray", "exec", str(config), str(session)], check=True, cwd=ROOT)
    dump = subprocess.run(["cosmic-ray", "dump", str(session)], check=True, capture_output=True, text=True, cwd=ROOT)
    counts = {"killed": 0, "survived": 0, "incompetent": 0, "pending": 0}
    survivors = []
    for line in dump.stdout.splitlines():
        job, result = json.loads(line)
        outcome = (result or {}).get("test_outcome") or "pending"
        counts[outcome if outcome in counts else "incompetent"] += 1
        if outcome == "survived":
            survivors.append(result.get("diff", ""))
    scored = counts["killed"] + counts["survived"]
    return {**counts, "score": counts["killed"] / scored if scored else None, "survivors": survivors}


def main(modules: list[str]) -> int:
    work = Path(os.environ.get("DLM_MUTATION_DIR", "/tmp/dlm-mutation"))
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for module in modules or list(MODULES):
        if module not in MODULES:
            raise SystemExit(f"unknown module {module!r}; modules: {', '.join(MODULES)}")
        summary[module] = run_module(module, MODULES[module], work)
        summary_path.write_text(json.dumps(summary, indent=2))
    lines = ["| module | killed | survived | incompetent | score |", "|---|---|---|---|---|"]
    for module, r in summary.items():
        score = "—" if r["score"] is None else f"{100 * r['score']:.1f}%"
        lines.append(f"| {module} | {r['killed']} | {r['survived']} | {r['incompetent']} | {score} |")
    (work / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
