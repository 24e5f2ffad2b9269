"""Recipes: plain YAML mapped onto frozen dataclasses, with dotted command-line overrides.

``load_recipe("recipes/quickstart.yaml", ["optim.lr=3e-4", "train.max_steps=10"])`` reads the
YAML, applies the overrides (each value parsed as YAML, so ``1e-3``, ``true`` and ``[1, 2]``
work), and builds the dataclass tree. Unknown keys and wrong types are errors that name the
key, the expected type and the closest valid key; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from dlm.registry import close_matches

C = TypeVar("C")


class ConfigError(ValueError):
    """A recipe or command-line setting is wrong; the message names the key and the fix."""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML; a value that
    is not valid YAML, such as ``*.txt``, is taken as a string)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:  # not YAML (a glob like *.txt, a stray colon): the text itself
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below {part!r}, which is not a section")
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``; sections merge, values replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}."
                + close_matches(str(value), [str(a) for a in allowed])
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping) of {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown key {prefix}{key!r}; valid keys here: {', '.join(sorted(fields))}."
            + close_matches(str(key), list(fields))
        )
    kwargs = {}
    for name, value in data.items():
        default = _default_of(fields[name])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = _over(default, value)  # a section overrides the defaults its parent gives it
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field was left out
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: {exc}") from exc


def _default_of(f: dataclasses.Field) -> Any:
    """The value a parent gives a field when a recipe omits it (MISSING when it has none it can build:
    a section whose defaults alone do not validate, such as ``rl`` without ``init``)."""
    if f.default_factory is dataclasses.MISSING:
        return f.default
    try:
        return f.default_factory()
    except (ConfigError, ValueError, TypeError):
        return dataclasses.MISSING


def _over(default: Any, update: dict[str, Any]) -> dict[str, Any]:
    """``update`` on top of the dataclass instance ``default``, section by section (a mapping-valued
    field such as ``rl.rewards`` is replaced, not merged). Unknown keys are kept for from_dict to name."""
    out = {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}
    for key, value in update.items():
        inner = out.get(key)
        out[key] = _over(inner, value) if isinstance(value, dict) and dataclasses.is_dataclass(inner) else value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe path, or the name of a recipe shipped with dlm (``quickstart``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    from importlib import resources

    bundled = resources.files("dlm.recipes")
    name = path.name if path.suffix == ".yaml" else f"{path.name}.yaml"
    candidate = bundled / name
    if candidate.is_file():
        return Path(str(candidate))
    shipped = sorted(p.name.removesuffix(".yaml") for p in bundled.iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(
        f"recipe {str(recipe)!r} does not exist; give a YAML file path or a bundled recipe name "
        f"({', '.join(shipped)})." + close_matches(path.stem, shipped)
    )


def load_recipe(recipe: str | Path, overrides: list[str] | None = None, cls: type[C] | None = None) -> C:
    """Read a YAML recipe, apply dotted ``key=value`` overrides, and build ``cls``."""
    if cls is None:
        from dlm.train.config import RecipeConfig

        cls = typing.cast(type[C], RecipeConfig)
    path = resolve_recipe_path(recipe)
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of sections")
    data = merge(data, parse_overrides(list(overrides or [])))
    return from_dict(cls, data)
