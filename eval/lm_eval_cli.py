"""lm-eval's own command line with dlm's model and offline tasks registered.

    python -m dlm.eval.lm_eval_cli --model dlm --model_args pretrained=runs/quickstart --tasks dlm_stdlib_ppl
    accelerate launch -m dlm.eval.lm_eval_cli --model dlm --model_args pretrained=... --tasks ...

The ``dlm`` model is registered by importing ``dlm.eval``; dlm's local tasks are written to the
cache and used as ``--include_path`` unless you give one (lm-eval takes a single directory here;
``dlm eval --include-path`` takes several).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import dlm.eval  # noqa: F401  (registers the "dlm" model)
    from dlm.eval.run import task_dir
    from dlm.eval.tasks import materialize

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv:
        argv += ["--include_path", str(materialize(task_dir()))]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
