"""Where a completion ends: at its first EOS token, or at a stop string (a criterion the block loop
checks after each block, and the final cut of the text)."""

from __future__ import annotations

import torch
from torch import Tensor


class StopStrings:
    """Finished when the decoded text of a row contains any of ``strings`` (mask tokens skipped)."""

    def __init__(self, tokenizer, strings: list[str]):
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer, self.strings = tokenizer, list(strings)

    def __call__(self, generated: Tensor) -> Tensor:
        mask_id = self.tokenizer.mask_token_id
        texts = [self.tokenizer.decode([t for t in row.tolist() if t != mask_id]) for row in generated]
        return torch.tensor([any(s in text for s in self.strings) for text in texts])


def until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first EOS (all of them when there is none, or no EOS id)."""
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens


def cut_at_stop(text: str, strings: list[str]) -> str:
    """The text up to (not including) the first stop string (empty strings never stop)."""
    cuts = [text.index(s) for s in strings if s and s in text]
    return text[: min(cuts)] if cuts else text
