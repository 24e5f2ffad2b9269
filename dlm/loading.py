"""One loader for every entry point: ``dlm.load(path_or_hub_id) -> (model, tokenizer, path)``.

Accepts a dlm model directory, a training ``output_dir`` (its ``final/`` or newest checkpoint), a
checkpoint of a family ``dlm convert`` knows (LLaDA, Dream, SDAR, Llama, Qwen2, Qwen3; converted on
the fly into ``$DLM_CACHE`` — default ``~/.cache/dlm/converted`` — once, then reused), or a hub id of
either. Anything else loads through transformers only when the caller says how (``auto_class``, or
``trust_remote_code`` for a remote-code masked-diffusion model); otherwise the error lists the
supported families. A name that is neither a local checkpoint nor reachable on the hub is answered
at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dlm.model.convert import ConvertError, convert, family_names, family_of, fetch_source, is_hub_id


def resolve_checkpoint(path: str | Path) -> Path:
    """A local model directory: the path itself, or ``<run>/final`` / its newest ``checkpoint-<step>``."""
    from dlm.train.checkpoint import list_checkpoints

    root = Path(path).expanduser()
    if (root / "config.json").is_file():
        return root
    if (root / "final" / "config.json").is_file():
        return root / "final"
    found = list_checkpoints(root)
    if found:
        return found[-1]
    raise FileNotFoundError(
        f"no model at {str(path)!r}: expected a directory with config.json, a training output_dir with final/ "
        "or checkpoint-<step>/ inside, or a hub id (org/name)"
    )


def locate(name_or_path: str | Path) -> Path:
    """The local directory holding the model: resolved from a run directory or downloaded from the hub."""
    name = str(name_or_path)
    if is_hub_id(name):
        return fetch_source(name)
    return resolve_checkpoint(name)


def dlm_cache() -> Path:
    """dlm's cache directory: ``$DLM_CACHE``, default ``~/.cache/dlm`` (converted models, lm-eval task data)."""
    return Path(os.environ.get("DLM_CACHE", "~/.cache/dlm")).expanduser()


def cache_root() -> Path:
    return dlm_cache() / "converted"


def converted(source: Path, config: dict, family: str | None = None) -> Path:
    """The dlm conversion of ``source`` (made once; keyed by its path, config and weights' sizes and times)."""
    fam = family_of(config, family)
    stamp = [str(source.resolve()), fam.name]
    for f in sorted(source.glob("*.safetensors")) + [source / "config.json"]:
        st = f.stat()
        stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    out = cache_root() / f"{fam.name}-{source.name}-{key}"
    if not (out / "config.json").is_file():
        convert(source, out, family=fam.name)
    return out


def load(
    name_or_path: str | Path,
    *,
    dtype=None,
    device: str | None = None,
    trust_remote_code: bool = False,
    auto_class=None,
    family: str | None = None,
):
    """``(model, tokenizer, path)`` in eval mode on ``device`` (``path``: the directory loaded)."""
    from transformers import AutoModel, AutoTokenizer

    import dlm.model  # noqa: F401  (registers the dlm model type)

    path = locate(name_or_path)
    config = json.loads((path / "config.json").read_text())
    remote = False
    if config.get("model_type") != "dlm":
        try:
            path = converted(path, config, family)
        except ConvertError:
            if auto_class is None and not trust_remote_code:
                raise ConvertError(
                    f"{name_or_path} is a {config.get('model_type')!r} checkpoint; dlm runs dlm checkpoints and "
                    f"converts these families: {', '.join(family_names())}. For a masked-diffusion model with "
                    "its own modeling code, pass trust_remote_code"
                ) from None
            remote = trust_remote_code
    is_dlm = json.loads((path / "config.json").read_text()).get("model_type") == "dlm"
    loader = AutoModel if is_dlm or auto_class is None else auto_class
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = loader.from_pretrained(str(path), trust_remote_code=remote, **kwargs)
    if device is not None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=remote)
    return model.eval(), tokenizer, path
