"""dlm.decode: samplers for masked diffusion LMs behind one interface (SPEC §3).

    decoder = build_decoder("confidence", gen_length=256, steps=256, block_length=32)
    out = decoder(model, prompt_ids, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    out.tokens, out.step_map, out.logprobs, out.nfe

``model`` is any module whose forward takes ``input_ids`` (and ``attention_mask``) and returns
logits ``[B, T, V]`` or an object with ``.logits``. Decoders: ``ancestral``, ``first_hitting``,
``confidence`` (+ threshold / factor rules), all semi-autoregressive with ``block_length``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from dlm.registry import Registry, close_matches

DECODERS: Registry[type] = Registry("decoder")


def build_decoder(name: str, **cfg: Any):
    """A decoder from its registry name and settings; unknown names and keys list what exists."""
    from dlm.decode import ancestral, confidence, first_hitting  # noqa: F401  (register the built-ins)

    try:
        cls = DECODERS.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    allowed = [f.name for f in fields(cls)]
    for key in cfg:
        if key not in allowed:
            raise ValueError(
                f"decoder {name!r} has no setting {key!r}; its settings: {', '.join(allowed)}."
                + close_matches(key, allowed)
            )
    return cls(**cfg)


def decoder_names() -> list[str]:
    from dlm.decode import ancestral, confidence, first_hitting  # noqa: F401

    return DECODERS.names()
