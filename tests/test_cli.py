"""The command line itself: help that answers without torch, every option explained, registries
that know their built-ins without importing them."""

import argparse
import subprocess
import sys

import pytest

import dlm
from dlm.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "dlm"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from dlm.cli import build_parser\n"
        "parser = build_parser()\n"
        "for argv in ([], ['train'], ['generate'], ['eval'], ['ppl'], ['tune'], ['rl'], ['convert'],\n"
        "             ['bench', 'decode'], ['bench', 'train'], ['bench', 'guide'], ['bench', 'memory']):\n"
        "    try:\n"
        "        parser.parse_args([*argv, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr, out.stderr


def test_version():
    out = subprocess.run([sys.executable, "-m", "dlm.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"dlm {dlm.__version__}", out


def test_every_option_has_help_and_shows_its_default():
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"{name} {flag} has no help text"
            default = action.default
            if action.option_strings and default not in (None, False, []):
                shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
                formatter = parser._get_formatter()
                assert "default" in formatter._get_help_string(action), f"{name} {flag}: default not shown"
                assert "default" in action.help or shown in text, f"{name} {flag}: default {shown} not in the help"


def test_bench_train_objectives_are_checked_against_the_registry(capsys):
    parser = build_parser()
    assert parser.parse_args(["bench", "train", "--objectives", "mdlm,ar"]).objectives == "mdlm,ar"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "train", "--objectives", "mdlm,mdml"])
    err = capsys.readouterr().err
    assert "unknown objective 'mdml'; known: ar, bd3lm, exact_count, mdlm," in err and "Did you mean 'mdlm'?" in err


def test_choices_come_from_the_registries():
    from dlm.decode import CACHES, DECODERS
    from dlm.decode.guides import GUIDES

    parsers = dict(_parsers(build_parser()))
    generate = {a.dest: a for a in parsers["dlm generate"]._actions}
    assert list(generate["decoder"].choices) == DECODERS.names()
    assert tuple(generate["cache"].choices) == CACHES
    assert list(generate["guide"].choices) == GUIDES.names()


@pytest.mark.parametrize(
    "where", ["dlm.decode:DECODERS", "dlm.decode.guides:GUIDES", "dlm.train.objectives:OBJECTIVES"]
)
def test_every_built_in_name_registers_from_its_module(where):
    """A built-in name the registry lists without importing must resolve, on lookup, to the
    component its module registers under that name."""
    import importlib

    module, name = where.split(":")
    registry = getattr(importlib.import_module(module), name)
    for name in registry._builtins:  # (other tests register components of their own)
        component = registry.get(name)
        assert component.__module__ == registry._builtins[name], (name, component.__module__)
    with pytest.raises(KeyError, match="Did you mean"):
        registry.get(registry.names()[0] + "x")


def test_a_missing_run_beside_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    from dlm.model.convert import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("runs/nothere")  # nothing local: it may be on the hub
    (tmp_path / "runs").mkdir()
    assert not is_hub_id("runs/nothere")  # a missing run, answered at once
    assert not is_hub_id("./org/name") and not is_hub_id("/abs/path")


def test_rl_with_a_missing_init_names_the_command_that_creates_it(tmp_path, monkeypatch, capsys):
    from dlm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["rl", "rl-quickstart", "train.output_dir=out"]) == 2
    err = capsys.readouterr().err
    assert "rl.init='runs/rl-sft'" in err and "Create it first: dlm train recipes/repeat-task.yaml" in err
    assert not (tmp_path / "out").exists()  # nothing created for a run that cannot start


def test_an_unknown_eval_task_lists_dlms_tasks_and_the_closest_name():
    from dlm.config import ConfigError
    from dlm.eval.run import check_tasks

    class Manager:  # the two TaskManager members check_tasks reads
        all_tasks = ["dlm_repeat", "dlm_repeat_mc", "dlm_arithmetic", "hellaswag", "mmlu_abstract_algebra"]

        def match_tasks(self, names):
            import fnmatch

            return [t for t in self.all_tasks for n in names if fnmatch.fnmatch(t, n)]

    check_tasks(["dlm_repeat", "mmlu_*"], Manager())  # names and globs pass
    with pytest.raises(ConfigError) as exc:
        check_tasks(["dlm_repeat", "dlm_reapet"], Manager())
    text = str(exc.value)
    assert "unknown task 'dlm_reapet'" in text and "Did you mean 'dlm_repeat'?" in text
    assert "dlm_arithmetic, dlm_repeat, dlm_repeat_mc" in text


def test_eval_summary_of_likelihood_only_tasks_names_no_decoder():
    from types import SimpleNamespace

    from dlm.eval.run import summary

    lm = SimpleNamespace(
        generated_tokens=0,
        generation_seconds=0.0,
        estimator="exact_count",
        mc_num=8,
        decoder="confidence",
        decoder_settings={},
    )
    line = summary(lm, {"wall_seconds": 3.0, "generated_tokens_per_s": None})
    assert "likelihood only: exact_count estimator, mc_num 8" in line and "decoder" not in line
    lm.generated_tokens, lm.generation_seconds, lm.decoder_settings = 64, 2.0, {"cache": "dual"}
    line = summary(lm, {"wall_seconds": 3.0, "generated_tokens_per_s": 32.0})
    assert (
        "64 generated tokens in 2.0 s of decoding (32.0 tokens/s)" in line and "decoder confidence, cache=dual" in line
    )


def test_python_m_dlm_train_rl_answers_errors_like_dlm_rl(tmp_path):
    """A missing rl.init, through the module entry point: the one-line error of ``dlm rl``."""
    out = subprocess.run(
        [sys.executable, "-m", "dlm.train.rl", "rl-quickstart", "train.output_dir=out"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("dlm rl: error: rl.init='runs/rl-sft'") and "Traceback" not in out.stderr
    usage = subprocess.run([sys.executable, "-m", "dlm.train.rl"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "usage: dlm rl" in usage.stderr
