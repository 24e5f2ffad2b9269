"""dlm.decode: samplers for masked diffusion LMs behind one interface (docs/decoders.md).

    decoder = build_decoder("confidence", gen_length=256, steps=256, block_length=32)
    out = decoder(model, prompt_ids, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    out.tokens, out.step_map, out.logprobs, out.nfe

``model`` is any module whose forward takes ``input_ids`` (and ``attention_mask``) and returns
logits ``[B, T, V]`` or an object with ``.logits``. Decoders: ``ancestral``, ``first_hitting``,
``confidence`` (+ threshold / factor rules), all semi-autoregressive with ``block_length``.
"""

from __future__ import annotations

from typing import Any

from dlm.registry import Registry

DECODERS: Registry[type] = Registry(
    "decoder",
    builtins={
        "ancestral": "dlm.decode.ancestral",
        "first_hitting": "dlm.decode.first_hitting",
        "confidence": "dlm.decode.confidence",
    },
)
CACHES = ("none", "exact", "prefix", "dual", "delayed")  # see dlm.decode.caches


def build_decoder(name: str, **cfg: Any):
    """A decoder from its registry name and settings; unknown names and keys list what exists."""
    return DECODERS.build(name, **cfg)


def decoder_names() -> list[str]:
    """The registered decoders (the built-ins without importing them)."""
    return DECODERS.names()
