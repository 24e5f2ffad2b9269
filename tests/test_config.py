from pathlib import Path

import pytest
import torch

from dlm.config import ConfigError, from_dict, load_recipe, parse_overrides
from dlm.model.build import build_model
from dlm.train.config import RecipeConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
RL_RECIPES = [p for p in RECIPES if p.stem.startswith("rl-")]
RECIPES = [p for p in RECIPES if p not in RL_RECIPES]


def test_unknown_top_level_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*Did you mean 'train'"):
        from_dict(RecipeConfig, {"trian": {}})


def test_unknown_nested_key_names_the_section():
    with pytest.raises(ConfigError, match=r"optim\.'lrr'.*Did you mean 'lr'"):
        from_dict(RecipeConfig, {"optim": {"lrr": 1e-3}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"max_steps": "ten"}}, "train.max_steps: expected an integer, got 'ten'"),
        ({"train": {"max_steps": True}}, "train.max_steps: expected an integer"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
        ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision: 'fp8' is not allowed"),
        ({"optim": {"betas": 0.9}}, "optim.betas: expected a list"),
        ({"train": 3}, "train: expected a section"),
    ],
)
def test_wrong_types_name_key_and_expectation(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(RecipeConfig, data)


def test_yaml_string_numbers_are_accepted_as_floats():
    cfg = from_dict(RecipeConfig, {"optim": {"lr": "3e-4"}})
    assert cfg.optim.lr == pytest.approx(3e-4)


def test_dotted_overrides_apply_and_parse_as_yaml():
    cfg = load_recipe(RECIPES[0], ["optim.lr=1e-3", "train.max_steps=5", "objective=ar", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 5 and cfg.objective == "ar"
    assert cfg.optim.betas == [0.8, 0.9]


def test_an_override_value_that_is_not_yaml_is_a_string():
    assert parse_overrides(["data.file_glob=*.txt", "data.dataset=**/notes"]) == {
        "data": {"file_glob": "*.txt", "dataset": "**/notes"}
    }
    assert parse_overrides(["train.max_steps=5"]) == {"train": {"max_steps": 5}}  # YAML values still parse
    assert load_recipe(RECIPES[0], ["data.file_glob=*.txt"]).data.file_glob == "*.txt"


def test_override_errors():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="unknown key train.'max_step'.*Did you mean 'max_steps'"):
        load_recipe(RECIPES[0], ["train.max_step=3"])


def test_unknown_objective_lists_known_ones():
    with pytest.raises(ConfigError, match=r"objective='mdml'.*mdlm.*Did you mean 'mdlm'"):
        from_dict(RecipeConfig, {"objective": "mdml"})


def test_unknown_schedule_lists_known_ones():
    with pytest.raises(ConfigError, match="known schedules: cosine, loglinear, polynomial"):
        from_dict(RecipeConfig, {"diffusion": {"schedule": "linear-ish"}})


def test_sequence_length_above_model_maximum_is_an_error():
    with pytest.raises(ConfigError, match="data.seq_len=2048 exceeds model.max_position_embeddings=1024"):
        from_dict(RecipeConfig, {"data": {"seq_len": 2048}, "model": {"max_position_embeddings": 1024}})


def test_missing_recipe_file_names_bundled_recipes():
    with pytest.raises(ConfigError, match="does not exist.*quickstart"):
        load_recipe("recipes/no-such-recipe.yaml")


def test_bundled_recipe_by_name():
    assert load_recipe("quickstart").objective == "mdlm"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses_and_builds_on_meta(recipe):
    cfg = load_recipe(recipe)
    if cfg.model.init_from is not None:  # starts from a checkpoint made elsewhere (tests/test_convert.py runs A2D)
        assert cfg.objective != "ar" and cfg.train.max_steps > 0
        return
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.tokenizer.vocab_size, cfg.tokenizer.vocab_size - 1)
    assert model.config.max_position_embeddings >= cfg.data.seq_len
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("recipe", RL_RECIPES, ids=[p.stem for p in RL_RECIPES])
def test_every_rl_recipe_parses(recipe):
    from dlm.train.rl.loop import RLRecipe

    cfg = load_recipe(recipe, cls=RLRecipe)
    assert cfg.rl.group_size >= 2 and cfg.rl.init


def test_a_section_overrides_the_defaults_its_parent_gives_it():
    """RL's train/optim sections default to RL settings; setting one key must not fall back to the
    pretraining defaults for the others (output_dir=runs/quickstart would resume a pretraining run)."""
    from dlm.train.rl.loop import RLRecipe

    cfg = from_dict(RLRecipe, {"rl": {"init": "x", "rewards": {"repeat": 1.0}}, "optim": {"lr": 1e-4},
                               "train": {"max_steps": 30}})  # fmt: skip
    default = RLRecipe(rl=cfg.rl)
    assert cfg.train.output_dir == default.train.output_dir == "runs/rl" and cfg.train.max_steps == 30
    assert (cfg.optim.warmup_steps, cfg.optim.weight_decay) == (default.optim.warmup_steps, default.optim.weight_decay)
    assert cfg.optim.lr == 1e-4 and cfg.rl.rewards == {"repeat": 1.0}  # a mapping field is replaced, not merged
