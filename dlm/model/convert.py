"""``dlm convert SOURCE OUTPUT``: published checkpoints as dlm checkpoints.

One backbone runs every family; a family is a config reader (source ``config.json`` → ``DLMConfig``
fields) and a key renamer (source state-dict key → dlm key). Conventions, checked against each
family's public modeling code (see ``docs/checkpoints.md``):

========  ===========  ==============  =====  ==========  =======  =========================================
family    model_type   attention       shift  q/k/v bias  QK-norm  keys
========  ===========  ==============  =====  ==========  =======  =========================================
llada     llada        bidirectional   no     no          no       ``model.transformer.blocks.i.*``; ``ff_proj``
                                                                   is the gate, ``up_proj`` the linear branch
dream     Dream        bidirectional   yes    yes         no       Qwen2 layout
sdar      sdar         block-causal    no     no          yes      Qwen3 layout; ``block_size`` (default 4)
llama     llama        causal          yes    opt.        no       Llama layout (AR: logits shifted by the head)
qwen2     qwen2        causal          yes    yes         no       Qwen2 layout
qwen3     qwen3        causal          yes    opt.        yes      Qwen3 layout
========  ===========  ==============  =====  ==========  =======  =========================================

"shift" is ``logits_shift``: the source's hidden state ``i`` predicts token ``i + 1`` (Dream and every
AR model); dlm moves that shift into the model so decoders, caches, likelihoods and RL read position
``i`` as token ``i`` for every family.

Conversion streams: each source tensor is read (safetensors, memory-mapped), renamed, cast to
``dtype`` and appended to an output shard that is written once it holds ``max_shard_bytes``, so
peak memory is about one output shard, whatever the checkpoint's size. The output is written to a
temporary directory and renamed when complete. Source keys are checked (names and shapes) against
the converted config before anything is written; a mismatch names the first missing and unexpected
keys. The tokenizer is copied; a source without a mask token gets one (``<|mask|>``), and the
embeddings (and an untied head) grow by rows initialised to the mean embedding when it does not fit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dlm.registry import Registry, close_matches
from dlm.utils import DTYPE_NAMES, torch_dtype

MASK_TOKEN = "<|mask|>"


class ConvertError(ValueError):
    """A checkpoint dlm cannot convert; the message names the problem and the fix."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config: Callable[[dict, int | None], dict]
    """(source config, block size override) -> DLMConfig keyword arguments."""
    rename: Callable[[str], str | None]
    """source key -> dlm key; None drops the key (buffers such as ``rotary_emb.inv_freq``)."""


FAMILIES: Registry[Family] = Registry("model family")


def family_names() -> list[str]:
    return FAMILIES.names()


def family_of(config: dict, override: str | None = None) -> Family:
    """The family of a source ``config.json`` (``override`` names it explicitly)."""
    if override is not None:
        try:
            return FAMILIES.get(override)
        except KeyError as exc:
            raise ConvertError(f"--family: {exc.args[0]}") from None
    model_type = config.get("model_type")
    families = [FAMILIES.get(name) for name in FAMILIES]
    for family in families:
        if model_type in family.model_types:
            return family
    hint = close_matches(str(model_type), [t for f in families for t in f.model_types])
    supported = ", ".join(f"{f.name} (model_type {' / '.join(f.model_types)})" for f in families)
    raise ConvertError(
        f"model_type {model_type!r} is not a family dlm converts; supported: {supported}.{hint} "
        "Pass --family NAME if the checkpoint follows one of these layouts under another model_type"
    )


# ----------------------------------------------------------------------------- config readers


def _require(config: dict, family: str, checks: dict[str, object]) -> None:
    """Refuse features the backbone does not have, naming the config field."""
    for key, wanted in checks.items():
        value = config.get(key, wanted)
        if value != wanted:
            raise ConvertError(
                f"{family} checkpoint has {key}={value!r}; dlm's backbone supports only {key}={wanted!r}"
            )


def _rope(config: dict) -> tuple[float, dict | None]:
    """``rope_theta`` and a non-default RoPE parameter dict from a transformers-style config
    (``rope_parameters`` in transformers ≥ 5, ``rope_theta`` + ``rope_scaling`` before)."""
    params = dict(config.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
    if not params and config.get("rope_scaling"):
        params = dict(config["rope_scaling"])
    rope_type = params.pop("type", None) or params.get("rope_type", "default")
    params["rope_type"] = rope_type
    return float(theta), (None if rope_type == "default" else params)


def _hf_config(config: dict, **extra) -> dict:
    """DLMConfig fields shared by the Llama / Qwen layouts (Dream, SDAR and the AR families)."""
    _require(config, config.get("model_type", "?"), {"hidden_act": "silu", "mlp_bias": False})
    if config.get("use_sliding_window"):
        raise ConvertError("the checkpoint uses sliding-window attention, which dlm's backbone does not have")
    theta, rope = _rope(config)
    heads = config["num_attention_heads"]
    max_positions = config.get("max_position_embeddings", 2048)
    if rope is not None and rope["rope_type"] == "dynamic":  # dynamic NTK scales beyond the trained context
        rope.setdefault("original_max_position_embeddings", max_positions)
        max_positions = int(max_positions * rope["factor"])
    return dict(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        max_position_embeddings=max_positions,
        rope_theta=theta,
        rope_config=rope,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        mask_token_id=config.get("mask_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        **extra,
    )


def _hf_rename(key: str) -> str | None:
    if key.endswith("rotary_emb.inv_freq"):
        return None
    return key.removeprefix("model.")


def _llada_config(config: dict, block_size: int | None) -> dict:
    _require(
        config,
        "llada",
        {
            "activation_type": "silu",
            "block_type": "llama",
            "layer_norm_type": "rms",
            "include_bias": False,
            "include_qkv_bias": False,
            "attention_layer_norm": False,
            "scale_logits": False,
            "input_emb_norm": False,
            "alibi": False,
            "rope": True,
            "block_group_size": 1,
            "bias_for_layer_norm": False,
        },
    )
    heads, d = config["n_heads"], config["d_model"]
    kv = 1 if config.get("multi_query_attention") else (config.get("n_kv_heads") or heads)
    return dict(
        vocab_size=config.get("embedding_size") or config["vocab_size"],
        hidden_size=d,
        intermediate_size=config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d,
        num_hidden_layers=config["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=d // heads,
        max_position_embeddings=config.get("max_sequence_length", 4096),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        mask_token_id=config.get("mask_token_id", 126336),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        attention_mode="bidirectional",
    )


LLADA_LAYER = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",  # LLaDALlamaBlock: ff_out(act(ff_proj(x)) * up_proj(x))
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
LLADA_TOP = {"wte": "embed_tokens", "ln_f": "norm", "ff_out": "lm_head"}


def _llada_rename(key: str) -> str:
    if m := re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.weight", key):
        layer = LLADA_LAYER.get(m.group(2))
        return f"layers.{m.group(1)}.{layer}.weight" if layer else key
    if m := re.fullmatch(r"model\.transformer\.(\w+)\.weight", key):
        return f"{LLADA_TOP.get(m.group(1), m.group(1))}.weight"
    return key  # left as is: reported as unexpected by the key check


def _sdar_config(config: dict, block_size: int | None) -> dict:
    block = block_size or config.get("block_size") or 4
    bias = bool(config.get("attention_bias", False))
    fields = _hf_config(
        config, qk_norm=True, qkv_bias=bias, o_bias=bias, attention_mode="block_causal", block_size=int(block)
    )
    return fields | {"mask_token_id": config.get("mask_token_id", 151669)}


def _register(name: str, model_types: tuple[str, ...], config, rename=_hf_rename) -> None:
    FAMILIES.register(name)(Family(name, model_types, config, rename))


_register("llada", ("llada",), _llada_config, _llada_rename)
_register(
    "dream",
    ("Dream", "dream"),
    lambda c, b: (
        _hf_config(c, qkv_bias=True, logits_shift=True, attention_mode="bidirectional")
        | {"mask_token_id": c.get("mask_token_id", 151666)}
    ),
)
_register("sdar", ("sdar",), _sdar_config)
_register(
    "llama",
    ("llama",),
    lambda c, b: _hf_config(
        c,
        qkv_bias=bool(c.get("attention_bias")),
        o_bias=bool(c.get("attention_bias")),
        logits_shift=True,
        attention_mode="causal",
    ),
)
_register("qwen2", ("qwen2",), lambda c, b: _hf_config(c, qkv_bias=True, logits_shift=True, attention_mode="causal"))
_register(
    "qwen3",
    ("qwen3",),
    lambda c, b: _hf_config(
        c,
        qk_norm=True,
        qkv_bias=bool(c.get("attention_bias")),
        o_bias=bool(c.get("attention_bias")),
        logits_shift=True,
        attention_mode="causal",
    ),
)


# ----------------------------------------------------------------------------- weights


def weight_files(source: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory (index order), or its single file."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [source / f for f in files]
    found = sorted(source.glob("*.safetensors"))
    if not found:
        raise ConvertError(
            f"{source} holds no .safetensors weights; convert .bin checkpoints to safetensors first "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    return found


def _source_shapes(files: list[Path]) -> dict[str, tuple[list[int], Path]]:
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shapes[key] = (f.get_slice(key).get_shape(), path)
    return shapes


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from dlm.model.modeling import DLMModel

    with torch.device("meta"):
        model = DLMModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_keys(renamed: dict[str, list[int]], expected: dict[str, tuple[int, ...]], family: str) -> None:
    """Names and shapes of the renamed source keys against the converted model's."""
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ConvertError(
            f"the checkpoint's weights do not match the {family} layout: "
            f"missing {missing[:5] or 'none'}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5] or 'none'}{' ...' if len(unexpected) > 5 else ''}; "
            "check --family (or that the checkpoint is complete)"
        )
    for key, shape in expected.items():
        have = tuple(renamed[key])
        if have != shape and not (key in ("embed_tokens.weight", "lm_head.weight") and have[1:] == shape[1:]):
            raise ConvertError(f"{key} has shape {list(have)} but the config implies {list(shape)}")


class ShardWriter:
    """Accumulates tensors and writes a safetensors shard each time ``max_bytes`` is reached."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.size, self.total, self.files = 0, 0, []
        self.where: dict[str, str] = {}

    def add(self, key: str, tensor: Tensor) -> None:
        self.buffer[key] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(self.out / name), metadata={"format": "pt"})
        self.files.append(name)
        self.where.update(dict.fromkeys(self.buffer, name))
        self.total += self.size
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        """Final names: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus the index."""
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.out / self.files[0], self.out / "model.safetensors")
            return
        final = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in final.items():
            os.replace(self.out / old, self.out / new)
        index = {"metadata": {"total_size": self.total}, "weight_map": {k: final[f] for k, f in self.where.items()}}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _grow_rows(tensor: Tensor, rows: int) -> Tensor:
    """Append rows initialised to the mean row (new tokens start where the vocabulary's centre is)."""
    if tensor.shape[0] >= rows:
        return tensor
    extra = tensor.float().mean(0, keepdim=True).expand(rows - tensor.shape[0], -1).to(tensor.dtype)
    return torch.cat([tensor, extra])


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_with_mask(source: Path, config: dict, mask_token_id: int | None, trust_remote_code: bool):
    """The source tokenizer with a mask token, and the mask id to use."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConvertError(
            f"{source} has no tokenizer dlm can load ({type(exc).__name__}); copy the tokenizer files "
            "(tokenizer.json / tokenizer_config.json) into it"
        ) from None
    mask_id = mask_token_id if mask_token_id is not None else config.get("mask_token_id")
    if mask_id is None and tok.mask_token is not None:
        mask_id = tok.mask_token_id
    if mask_id is None:
        tok.add_special_tokens({"mask_token": MASK_TOKEN})
        mask_id = tok.mask_token_id
    elif tok.mask_token is None or tok.mask_token_id != mask_id:
        token = tok.convert_ids_to_tokens(int(mask_id))
        if token is None:
            raise ConvertError(f"mask token id {mask_id} is not in the tokenizer's vocabulary of {len(tok)}")
        tok.mask_token = token
    return tok, int(mask_id)


# ----------------------------------------------------------------------------- convert


def convert(
    source: str | Path,
    output: str | Path,
    *,
    family: str | None = None,
    dtype: str | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    max_shard_bytes: int = 2 << 30,
    trust_remote_code: bool = False,
) -> Path:
    """Convert the checkpoint at ``source`` (a directory, or a hub id) into a dlm checkpoint at ``output``."""
    from dlm.model.configuration import DLMConfig

    src = fetch_source(source)
    out = Path(output).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not empty; choose a new output directory")
    config = json.loads((src / "config.json").read_text())
    fam = family_of(config, family)
    tok, mask_id = _tokenizer_with_mask(src, config, mask_token_id, trust_remote_code)
    try:
        fields = fam.config(config, block_size)
    except KeyError as exc:
        raise ConvertError(
            f"config.json has no {exc.args[0]!r}, which the {fam.name} layout needs; check --family"
        ) from None
    rows = max(fields["vocab_size"], -(-len(tok) // 64) * 64 if len(tok) > fields["vocab_size"] else 0)
    fields.update(vocab_size=rows, mask_token_id=mask_id)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConvertError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    try:
        dlm_config = DLMConfig(**{k: v for k, v in fields.items() if v is not None or k == "rope_config"})
    except ValueError as exc:
        raise ConvertError(f"{fam.name} config: {exc}") from None
    files = weight_files(src)
    shapes = _source_shapes(files)
    renamed = {fam.rename(k): (shape, k) for k, (shape, _) in shapes.items() if fam.rename(k) is not None}
    if dlm_config.tie_word_embeddings:
        renamed.pop("lm_head.weight", None)
    check_keys({k: s for k, (s, _) in renamed.items()}, _expected_shapes(dlm_config), fam.name)
    first_dtype = _first_dtype(files[0])
    target = torch_dtype(dtype) if dtype else first_dtype
    dlm_config.dtype = str(target).removeprefix("torch.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _stream(files, renamed, target, rows, ShardWriter(tmp, max_shard_bytes))
        dlm_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "dlm_convert.json").write_text(
            json.dumps({"source": str(source), "family": fam.name, "dtype": dlm_config.dtype}, indent=2)
        )
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _first_dtype(path: Path) -> torch.dtype:
    """The dtype the source stores its weights in (read from the header, no tensor loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def _stream(files: list[Path], renamed: dict, dtype: torch.dtype, rows: int, writer: ShardWriter) -> None:
    """Read, rename, cast and write every wanted source tensor, one at a time."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    wanted = {source_key: key for key, (_, source_key) in renamed.items()}
    bar = tqdm(total=len(wanted), desc="dlm convert", unit="tensor", leave=False)
    for path in files:
        with safe_open(str(path), "pt") as f:
            for source_key in f.keys():
                key = wanted.get(source_key)
                if key is None:
                    continue
                tensor = f.get_tensor(source_key).to(dtype)
                if key in ("embed_tokens.weight", "lm_head.weight"):
                    tensor = _grow_rows(tensor, rows)
                writer.add(key, tensor)
                del tensor
                bar.update()
    bar.close()
    writer.close()


# ----------------------------------------------------------------------------- sources


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path: nothing there, and no local ``org/`` directory either
    (``runs/nothere`` beside a ``runs/`` folder is a missing run, not a hub id)."""
    path = Path(name).expanduser()
    local = name.startswith((".", "/", "~")) or path.exists() or path.parent.is_dir()
    return name.count("/") == 1 and not local


def fetch_source(source: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded (config, tokenizer, safetensors) into the
    transformers cache. Offline or unknown ids are answered at once with what to do."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists() or not is_hub_id(str(source)):
        raise ConvertError(f"{source!r} is not a checkpoint directory (no config.json) and not a hub id (org/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]
    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns, etag_timeout=5))
    except Exception as exc:  # offline, unknown repository, gated model: one clear line
        raise ConvertError(
            f"{source!r} is neither a local checkpoint nor reachable on the hub ({type(exc).__name__}); "
            "check the id and your network, or download it and pass the directory"
        ) from None
