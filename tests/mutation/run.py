"""Mutation score of dlm's core math with cosmic-ray (``pip install -e ".[mutation]"``).

    python tests/mutation/run.py                          # every module below, two lanes
    python tests/mutation/run.py train/ema.py dlm/model/masks.py
    python tests/mutation/run.py --rerun-survivors        # after adding tests: retry only the survivors
    python tests/mutation/run.py --fresh                  # forget earlier sessions

Each lane is a copy of the repository (tracked and untracked, non-ignored files) under
``$DLM_MUTATION_DIR`` (default ``/tmp/dlm-mutation``), so the checkout is never mutated and stays
usable while a run goes on. A lane's modules are mutated one mutant at a time, and only the tests
that cover a module run against its mutants (``-x``, a per-mutant timeout) in a warm pytest
(``forkserver.py``: torch and transformers imported once, a fresh fork per mutant).

Mutants inside annotations and docstrings are skipped (with ``from __future__ import annotations``
they are strings that never run); every other mutant of cosmic-ray's core operators is scored.
Sessions resume where they stopped and are re-created when a module's source changed;
``summary.json`` / ``summary.md`` hold per module the counts, the score, the wall time and every
surviving mutant's diff. ``docs/testing.md`` lists the survivors judged equivalent and why.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTEST = "-x -q -p no:cacheprovider"

#: module -> the tests that cover it (coverage picks, per mutant, the ones that execute its lines)
MODULES: dict[str, str] = {
    "dlm/schedules.py": "tests/test_schedules.py tests/test_objectives.py",
    "dlm/model/masks.py": "tests/test_model.py tests/test_bd3lm.py tests/test_cache.py",
    "train/objectives/mdlm.py": "tests/test_objectives.py",
    "train/objectives/exact_count.py": "tests/test_objectives.py",
    "train/objectives/sft.py": "tests/test_objectives.py",
    "train/objectives/ar.py": "tests/test_objectives.py tests/test_bd3lm.py",
    "train/objectives/bd3lm.py": "tests/test_bd3lm.py",
    "decode/sampling.py": "tests/test_decode.py tests/test_decoders.py",
    "decode/first_hitting.py": "tests/test_decoders.py tests/test_guides.py::test_policies_carry_their_row_state_through_a_reindex",
    "decode/confidence.py": "tests/test_decoders.py tests/test_generate_cli.py "
    "tests/test_guides.py::test_policies_carry_their_row_state_through_a_reindex "
    "tests/test_guides.py::test_reindexed_rows_continue_as_the_rows_they_copy",
    "decode/caches.py": "tests/test_cache.py tests/test_guides.py::test_reindexed_rows_continue_as_the_rows_they_copy",
    "train/rl/estimators.py": "tests/test_rl.py",
    "train/rl/loss.py": "tests/test_rl.py tests/test_rl_loop.py::test_sequence_and_none_normalisation_divide_by_what_they_say",
    "train/ema.py": "tests/test_ema.py",
}


def make_lane(lane: Path) -> None:
    """A fresh copy of the checkout's files (what ``git`` would commit, plus untracked new files)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    if lane.exists():
        shutil.rmtree(lane)
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (lane / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, lane / rel)


def inert_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of annotations and docstrings: code that never runs."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        notes = []
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            notes.append(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            notes.append(node.returns)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                notes.append(first)
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in notes]
    return spans


def skip_inert(session: Path, source: str) -> None:
    """Mark mutants inside annotations or docstrings as skipped."""
    spans = inert_spans(source)
    db = sqlite3.connect(session)
    rows = db.execute(
        "SELECT job_id, start_pos_row, start_pos_col, end_pos_row, end_pos_col FROM mutation_specs"
        " WHERE job_id NOT IN (SELECT job_id FROM work_results)"
    ).fetchall()
    inert = [job for job, *pos in rows if any(a <= tuple(pos[:2]) and tuple(pos[2:]) <= b for a, b in spans)]
    db.executemany(
        "INSERT INTO work_results (worker_outcome, output, test_outcome, diff, job_id) VALUES ('SKIPPED', NULL, NULL, NULL, ?)",
        [(job,) for job in inert],
    )
    db.commit()


def run_module(module: str, lane: Path, sock: Path, work: Path, rerun_survivors: bool, timeout: float) -> dict:
    name = module.replace("/", "_").removesuffix(".py")
    session, config = work / f"{name}.sqlite", work / f"{name}.toml"
    source = (lane / module).read_text()
    digest = hashlib.sha256(source.encode()).hexdigest()
    stamp = work / f"{name}.source"
    if session.exists() and (not stamp.exists() or stamp.read_text() != digest):
        session.unlink()  # the source changed: old mutants no longer line up with it
    client = f"{sys.executable} {HERE / 'forkserver.py'} run {sock} -- {PYTEST} {MODULES[module]}"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{lane / module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{client}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    if not session.exists():
        subprocess.run(["cosmic-ray", "init", str(config), str(session)], check=True, cwd=lane)
        stamp.write_text(digest)
    skip_inert(session, source)
    db = sqlite3.connect(session)  # a session made in another lane: mutate this lane's copy
    db.execute("UPDATE mutation_specs SET module_path = ?", (str(lane / module),))
    db.commit()
    if rerun_survivors:
        db = sqlite3.connect(session)
        db.execute("DELETE FROM work_results WHERE lower(test_outcome) = 'survived'")
        db.commit()
    baseline = subprocess.run(shlex.split(client), cwd=lane)
    if baseline.returncode != 0:
        raise SystemExit(f"{module}: its tests fail without a mutant (exit {baseline.returncode}); fix them first")
    started = time.perf_counter()
    # its own process group: a test client that loses its server stops this session alone (forkserver.run)
    subprocess.run(
        ["cosmic-ray", "exec", str(config), str(session)], check=True, cwd=lane, capture_output=True,
        start_new_session=True,
    )  # fmt: skip
    clock = work / f"{name}.seconds"  # wall time over every run of this session
    seconds = (float(clock.read_text()) if clock.exists() else 0.0) + time.perf_counter() - started
    clock.write_text(f"{seconds:.0f}")
    return tally(module, session, seconds)


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and the added lines of a mutant's diff, stripped and joined."""
    body = [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("---", "+++"))]
    return (
        " / ".join(ln[1:].strip() for ln in body if ln[0] == "-" and ln[1:].strip()),
        " / ".join(ln[1:].strip() for ln in body if ln[0] == "+" and ln[1:].strip()),
    )


def tally(module: str, session: Path, seconds: float) -> dict:
    """Counts of a session; survivors listed in equivalent.py are counted apart, with their reason."""
    from equivalent import EQUIVALENT

    known = {(before, after): why for before, after, why in EQUIVALENT.get(module, [])}
    counts = {"killed": 0, "survived": 0, "equivalent": 0, "incompetent": 0, "pending": 0, "skipped": 0}
    survivors, equivalent = [], []
    db = sqlite3.connect(session)
    for outcome, worker, diff in db.execute(
        "SELECT lower(r.test_outcome), lower(r.worker_outcome), r.diff FROM work_items w LEFT JOIN work_results r USING (job_id)"
    ):
        if worker == "skipped":
            counts["skipped"] += 1
            continue
        key = outcome if outcome in counts else ("pending" if worker is None else "incompetent")
        if key == "survived" and changed_lines(diff) in known:
            key = "equivalent"
            equivalent.append({"change": " -> ".join(changed_lines(diff)), "why": known[changed_lines(diff)]})
        elif key == "survived":
            survivors.append(diff)
        counts[key] += 1
    scored = counts["killed"] + counts["survived"]
    return {
        **counts,
        "score": counts["killed"] / scored if scored else None,  # of the non-equivalent mutants
        "seconds": round(seconds),
        "survivors": survivors,
        "equivalent_mutants": equivalent,
    }


def lane_worker(modules, lane, work, args, summary, lock) -> None:
    sock = work / f"{lane.name}.sock"
    server = subprocess.Popen(
        [sys.executable, str(HERE / "forkserver.py"), "serve", str(sock), str(lane),
         *sorted({t for m in modules for t in MODULES[m].split() if t.split("::")[0].endswith(".py")})],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        print(server.stdout.readline().strip(), flush=True)
        for module in modules:
            result = run_module(module, lane, sock, work, args.rerun_survivors, args.timeout)
            with lock:
                summary[module] = result
                (work / "summary.json").write_text(json.dumps(summary, indent=2))
            print(f"{module}: {result['killed']} killed, {result['survived']} survived, "
                  f"{result['equivalent']} equivalent, {result['skipped']} skipped (inert), {result['seconds']}s", flush=True)
    finally:
        server.kill()


def sessions_size(work: Path, module: str) -> int:
    """Mutants in a module's session (0 before its first run): used to balance the lanes."""
    session = work / (module.replace("/", "_").removesuffix(".py") + ".sqlite")
    if not session.exists():
        return len((ROOT / module).read_text())  # source length as a proxy
    return sqlite3.connect(session).execute("SELECT COUNT(*) FROM work_items").fetchone()[0] * 40


def run_lanes(args, work: Path, summary: dict) -> None:
    modules = sorted(args.modules or MODULES, key=lambda m: -sessions_size(work, m))
    lanes: list[list[str]] = [[] for _ in range(max(1, args.lanes))]
    loads = [0] * len(lanes)
    for module in modules:  # greedy: the biggest module to the least-loaded lane
        i = loads.index(min(loads))
        lanes[i].append(module)
        loads[i] += sessions_size(work, module)
    lock = threading.Lock()
    threads = []
    for i, lane_modules in enumerate(lanes):
        if not lane_modules:
            continue
        lane = work / f"lane-{i}"
        make_lane(lane)
        threads.append(threading.Thread(target=lane_worker, args=(lane_modules, lane, work, args, summary, lock)))
        threads[-1].start()
    for thread in threads:
        thread.join()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: all)")
    parser.add_argument("--lanes", type=int, default=2, help="parallel copies of the repository (default 2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant (default 120)")
    parser.add_argument("--rerun-survivors", action="store_true", help="retry the survivors of earlier sessions")
    parser.add_argument("--fresh", action="store_true", help="delete earlier sessions first")
    parser.add_argument("--report", action="store_true", help="only tally the sessions there are (no mutant runs)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        raise SystemExit(f"unknown module(s) {', '.join(unknown)}; modules: {', '.join(MODULES)}")
    work = Path(os.environ.get("DLM_MUTATION_DIR", "/tmp/dlm-mutation"))
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if args.report:
        for module in args.modules or MODULES:
            name = module.replace("/", "_").removesuffix(".py")
            if (work / f"{name}.sqlite").exists():
                clock = work / f"{name}.seconds"
                summary[module] = tally(module, work / f"{name}.sqlite", float(clock.read_text()) if clock.exists() else 0)
        summary_path.write_text(json.dumps(summary, indent=2))
    else:
        run_lanes(args, work, summary)
    lines = [
        "| module | mutants | inert (skipped) | killed | equivalent | survived | score | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module in MODULES:
        r = summary.get(module)
        if r:
            total = sum(r.get(k, 0) for k in ("killed", "survived", "equivalent", "incompetent", "pending", "skipped"))
            score = "—" if r["score"] is None else f"{100 * r['score']:.1f}%"
            lines.append(
                f"| {module} | {total} | {r.get('skipped', 0)} | {r['killed']} | {r.get('equivalent', 0)} "
                f"| {r['survived']} | {score} | {r.get('seconds', '?')} s |"
            )
    (work / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
