"""A terminal replay of the unmasking order: each frame shows the canvas after one step,
masked positions as ``░`` and the tokens decoded at that step highlighted."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from torch import Tensor

MASKED = "░"


def render_frames(
    history: list[Tensor], tokenizer, prompt_length: int, mask_token_id: int, row: int = 0, color: bool = False
) -> list[str]:
    frames, previous = [], None
    for canvas in history:
        ids = canvas[row, prompt_length:].tolist()
        pieces = []
        for pos, tok in enumerate(ids):
            if tok == mask_token_id:
                pieces.append(MASKED)
                continue
            piece = tokenizer.decode([tok])
            if color and previous is not None and previous[pos] == mask_token_id:
                piece = f"\x1b[1;32m{piece}\x1b[0m"  # decoded at this step
            pieces.append(piece)
        frames.append("".join(pieces))
        previous = ids
    return frames


def replay(frames: list[str], prompt: str, stream: TextIO | None = None, delay: float = 0.05) -> None:
    """Animate in a terminal; elsewhere print about ten evenly spaced frames."""
    stream = sys.stdout if stream is None else stream  # looked up now: callers may have redirected it
    if stream.isatty():
        for i, frame in enumerate(frames):
            stream.write(f"\x1b[2J\x1b[H[step {i + 1}/{len(frames)}]\n{prompt}{frame}\n")
            stream.flush()
            time.sleep(delay)
        return
    every = max(1, len(frames) // 10)
    for i, frame in enumerate(frames):
        if i % every == 0 or i == len(frames) - 1:
            stream.write(f"[step {i + 1}/{len(frames)}]\n{prompt}{frame}\n\n")
