"""A warm pytest for mutation runs: import the heavy libraries once, fork a fresh pytest per mutant.

Most of a mutant's test time is Python importing torch and transformers, not the tests. The server
imports every third-party module the selected tests load (never dlm itself, which the mutant
changes), then serves one request at a time: fork, run ``pytest.main(args)`` in the child (which
imports the mutated dlm fresh), answer with its exit code. The client is cosmic-ray's test command.

Tests are chosen by coverage, as mutmut does: at start the server records which tests execute each
line of dlm (one traced run of the selected test files). A mutant first runs only the tests that
execute the lines it changed; if they all pass, the whole selection runs before the mutant is
reported as surviving. Lines that run at import time (signatures, defaults, decorators, constants)
and lines no test executes always get the whole selection, so coverage only ever saves time: a
mutant is never reported as surviving tests that were not run.

    python tests/mutation/forkserver.py serve SOCKET LANE TEST_ARGS...    # warms up, then serves
    python tests/mutation/forkserver.py run SOCKET -- PYTEST_ARGS...       # one pytest run in LANE

``LANE`` is a copy of the repository; the server maps the import names ``dlm``, ``dlm.train``,
``dlm.decode`` and ``dlm.eval`` to that copy (as the editable install does for the checkout), so
lanes mutate their own files in parallel without touching the checkout.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: import name -> folder of the repository it comes from (pyproject's package-dir)
PACKAGES = {"dlm": "dlm", "dlm.train": "train", "dlm.decode": "decode", "dlm.eval": "eval"}
OWN = ("dlm", "tests", "conftest", "test_", "references", "__main__", "__mp_main__")


class LaneFinder(importlib.abc.MetaPathFinder):
    """Resolve dlm's packages to one lane's copy of the repository."""

    def __init__(self, lane: Path):
        self.lane = lane

    def find_spec(self, name, path=None, target=None):
        if name not in PACKAGES:
            return None
        folder = self.lane / PACKAGES[name]
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def _third_party_modules(lane: Path, test_args: list[str]) -> list[str]:
    """The modules a collection of the selected tests imports, minus dlm and the tests themselves."""
    probe = (
        "import sys, json, pytest\n"
        f"sys.meta_path.insert(0, __import__('forkserver').LaneFinder(__import__('pathlib').Path({str(lane)!r})))\n"
        "pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *sys.argv[1:]])\n"
        "sys.stderr.write('\\nMODULES ' + json.dumps(list(sys.modules)) + '\\n')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", probe, *test_args], cwd=lane, env=env, capture_output=True, text=True)
    line = next(ln for ln in out.stderr.splitlines() if ln.startswith("MODULES "))
    return [m for m in json.loads(line.removeprefix("MODULES ")) if not m.startswith(OWN)]


class TestMap:
    """Which tests execute each line of the lane's dlm sources, and the sources as they were."""

    def __init__(self, lane: Path, test_files: list[str]):
        self.lane = lane
        self.pristine = {p: p.read_text() for d in set(PACKAGES.values()) for p in (lane / d).rglob("*.py")}
        out = lane / ".testmap.json"
        pid = os.fork()
        if pid == 0:
            os._exit(_trace(lane, test_files, out))
        os.waitpid(pid, 0)
        raw = json.loads(out.read_text())
        self.seconds: dict[str, float] = raw.pop("__seconds__")
        self.lines = {Path(f): {int(k): set(v) for k, v in by_line.items()} for f, by_line in raw.items()}

    def changed_lines(self) -> dict[Path, set[int]]:
        """Lines (numbered as in the pristine source) that differ from it now."""
        changed = {}
        for path, before in self.pristine.items():
            now = path.read_text()
            if now == before:
                continue
            old, new = before.splitlines(), now.splitlines()
            lines = set()
            for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
                if tag != "equal":
                    lines |= set(range(i1 + 1, max(i2, i1 + 1) + 1))
            changed[path] = lines
        return changed

    def tests_for(self, changed: dict[Path, set[int]]) -> list[str] | None:
        """Node ids of the tests that execute every changed line, fastest first (with ``-x`` a
        killed mutant stops at its first failing test), or None when only the whole selection
        will do (a line run at import time, or by no test)."""
        chosen: set[str] = set()
        for path, lines in changed.items():
            by_line = self.lines.get(path, {})
            for line in lines:
                tests = by_line.get(line)
                if not tests or "" in tests:
                    return None
                chosen |= tests
        return sorted(chosen, key=lambda t: (self.seconds.get(t, 0.0), t))


def _trace(lane: Path, test_files: list[str], out: Path) -> int:
    """In a forked child: run the tests under coverage with one context per test; write the map."""
    import coverage
    import pytest

    cov = coverage.Coverage(data_file=None, source=[str(lane / d) for d in set(PACKAGES.values())])

    seconds: dict[str, float] = {}

    class Contexts:
        def pytest_runtest_setup(self, item):
            cov.switch_context(item.nodeid)

        def pytest_runtest_teardown(self, item):
            cov.switch_context("")

        def pytest_runtest_logreport(self, report):
            seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    cov.start()
    pytest.main(["-q", "-p", "no:cacheprovider", *test_files], plugins=[Contexts()])
    cov.stop()
    data = cov.get_data()
    data.set_query_contexts(None)
    result = {}
    for f in data.measured_files():
        by_line = data.contexts_by_lineno(f)
        result[f] = {line: sorted(ctx) for line, ctx in by_line.items()}
    result["__seconds__"] = seconds
    out.write_text(json.dumps(result))
    return 0


def serve(sock_path: str, lane: Path, test_args: list[str], timeout: float = 300.0) -> None:
    sys.dont_write_bytecode = True  # a mutant and the original can share a size and an mtime second
    os.chdir(lane)
    sys.path.insert(0, str(lane))
    sys.meta_path.insert(0, LaneFinder(lane))
    started = time.perf_counter()
    warmed = 0
    for name in _third_party_modules(lane, test_args):
        try:
            importlib.import_module(name)
            warmed += 1
        except Exception:  # noqa: BLE001  (an optional module a test guards; the child imports it or skips)
            pass
    import pytest  # noqa: F401
    import torch

    torch.set_num_threads(1)  # lanes run side by side; forked children must not inherit a warm thread pool
    tests = TestMap(lane, [a for a in test_args if _is_test(a)])
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    print(
        f"forkserver {lane}: {warmed} modules warm, {sum(len(v) for v in tests.lines.values())} lines mapped "
        f"to tests in {time.perf_counter() - started:.1f}s",
        flush=True,
    )
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                args = json.loads(conn.makefile().readline())
                conn.sendall(f"{_run_selected(args, tests, timeout)}\n".encode())
            except (BrokenPipeError, ConnectionError, json.JSONDecodeError):
                pass  # the client went away (cosmic-ray's own timeout): serve the next one


def _is_test(arg: str) -> bool:
    """A test file or node id (``tests/test_x.py``, ``tests/test_x.py::test_y``), not an option."""
    return arg.split("::")[0].endswith(".py")


def _run_selected(args: list[str], tests: TestMap, timeout: float) -> int:
    """The covering tests first; when they all pass, the rest of the selection (or all of it when
    no covering test is known)."""
    items = [a for a in args if _is_test(a)]
    covering = tests.tests_for(tests.changed_lines())
    rest = args
    if covering is not None:
        covering = [t for t in covering if any(t.split("::")[0] == i or t.startswith(i) for i in items)]
        if covering:
            code = _run_child([a for a in args if a not in items] + covering, timeout)
            if code not in (0, 5):  # 5: -k deselected every covering test
                return code
            rest = args + [f"--deselect={t}" for t in covering]
    code = _run_child(rest, timeout)
    return 0 if code == 5 else code  # 5: the covering tests were the whole selection


def _run_child(args: list[str], timeout: float) -> int:
    pid = os.fork()
    if pid == 0:  # the child: a fresh pytest over the (possibly mutated) lane
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        try:
            code = int(pytest.main(args))
        except BaseException:  # noqa: BLE001  (a mutant that breaks pytest itself is killed)
            code = 3
        os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                # killed from outside (the kernel's OOM killer): no verdict on this mutant
                raise RuntimeError(f"a test process was killed by SIGKILL (out of memory?): {args}")
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return 124  # a mutant that hangs the tests counts as killed, as cosmic-ray's own timeout does


def run(sock_path: str, args: list[str]) -> int:
    """One mutant's test run through the lane's server. Without an answer from the server (it
    died, or was never up) there is no verdict: rather than exit non-zero — which cosmic-ray would
    count as a killed mutant — stop the whole session (its process group), leaving the mutant and
    the rest pending for the next run."""
    for _ in range(30):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(sock_path)
            client.sendall((json.dumps(args) + "\n").encode())
            answer = client.makefile().readline()
            if answer.strip():
                return int(answer)
        except (ConnectionError, FileNotFoundError):
            pass
        time.sleep(1.0)
    print(f"forkserver at {sock_path} does not answer: stopping this mutation session", file=sys.stderr, flush=True)
    os.killpg(os.getpgid(0), signal.SIGTERM)
    return 125


if __name__ == "__main__":
    mode, sock = sys.argv[1], sys.argv[2]
    if mode == "serve":
        serve(sock, Path(sys.argv[3]).resolve(), sys.argv[4:])
    elif mode == "run":
        sys.exit(run(sock, sys.argv[sys.argv.index("--") + 1 :]))
    else:
        raise SystemExit(f"unknown mode {mode!r}: serve or run")
