"""``python -m dlm.train.rl RECIPE.yaml key=value ...`` / ``accelerate launch -m dlm.train.rl ...``:
``dlm rl``, with its errors answered the same way (one line, exit status 2)."""

from __future__ import annotations

import sys


def cli(argv: list[str] | None = None) -> int:
    from dlm.cli import main as dlm_main

    return dlm_main(["rl", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(cli())
