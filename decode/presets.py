"""Decode presets: a decoder and its settings in a YAML file (what ``dlm tune`` writes).

    decoder: confidence
    gen_length: 1024
    block_length: 32
    rule: threshold
    threshold: 0.9
    cache: dual
    open_next_at: 0.0
    max_open_blocks: 8

``dlm generate --preset FILE``, the lm-eval model's ``model_args preset=FILE`` and an RL recipe's
``decode: {preset: FILE}`` read it; settings given beside the preset win over the file's. A
``tuned:`` mapping (what the sweep measured for this setting) is kept for the reader and ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlm.config import ConfigError
from dlm.decode import build_decoder


class PresetError(ConfigError):
    """A preset file that cannot be read or does not describe a valid decoder."""


def load_preset(path: str | Path) -> tuple[str, dict[str, Any]]:
    """``(decoder name, settings)`` of the preset at ``path``, checked by building the decoder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PresetError(f"decode preset {path} does not exist (dlm tune writes one: OUT/preset.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PresetError(f"decode preset {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "decoder" not in data:
        raise PresetError(f"decode preset {path} must be a mapping with a `decoder:` key and its settings")
    settings = {k: v for k, v in data.items() if k not in ("decoder", "tuned")}
    name = str(data["decoder"])
    check(name, settings, f"decode preset {path}")
    return name, settings


def check(name: str, settings: dict[str, Any], where: str) -> None:
    """Build the decoder once so a bad setting is reported against ``where``."""
    try:
        build_decoder(name, **settings)
    except ValueError as exc:
        raise PresetError(f"{where}: {exc}") from None


def write_preset(path: str | Path, name: str, settings: dict[str, Any], tuned: dict[str, Any] | None = None) -> Path:
    """Write a preset atomically (a temporary file renamed into place)."""
    import yaml

    from dlm.utils import write_atomic

    check(name, settings, "the preset to write")
    body = {"decoder": name, **settings, **({"tuned": tuned} if tuned else {})}
    return write_atomic(path, yaml.safe_dump(body, sort_keys=False))


def apply_preset(settings: dict[str, Any]) -> dict[str, Any]:
    """Decoder settings with an optional ``preset`` key (a preset file): the preset's decoder and
    settings, overridden by the other keys given (``preset`` itself removed). A ``decoder`` given
    that is not the preset's is an error."""
    settings = dict(settings)
    preset = settings.pop("preset", None)
    if preset is None:
        return settings
    name, from_file = load_preset(preset)
    if settings.get("decoder", name) != name:
        raise PresetError(f"decoder {settings['decoder']!r} was given, but the decode preset {preset} is for {name!r}")
    return {**from_file, **settings, "decoder": name}
