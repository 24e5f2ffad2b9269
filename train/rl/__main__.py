"""``python -m dlm.train.rl RECIPE.yaml key=value ...`` (also under ``accelerate launch -m``)."""

import sys

from dlm.config import ConfigError, load_recipe
from dlm.train.rl.loop import RLRecipe, main

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m dlm.train.rl RECIPE.yaml [key=value ...]")
    try:
        main(load_recipe(sys.argv[1], sys.argv[2:], cls=RLRecipe))
    except ConfigError as exc:
        sys.exit(f"dlm rl: error: {exc}")
