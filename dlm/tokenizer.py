"""Tokenizers: any HF tokenizer by name or path, or a byte-level BPE trained locally.

Masked diffusion needs a mask token. ``prepare_tokenizer`` adds one when the tokenizer has
none (the model's embeddings are resized to match) and refuses with a clear error when
adding is turned off. An EOS token is required for packing documents and for stopping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS, MASK, PAD = "<|endoftext|>", "<|mdm_mask|>", "<|pad|>"


class TokenizerError(ValueError):
    """The tokenizer cannot serve masked diffusion as configured; the message says how to fix it."""


@dataclass(frozen=True)
class TokenizerConfig:
    name_or_path: str | None = None
    """HF hub name or local directory; None trains a byte-level BPE on the training text."""
    vocab_size: int = 4096
    """Vocabulary size of a locally trained BPE tokenizer (special tokens included)."""
    train_max_bytes: int = 20_000_000
    """How much training text the local BPE sees."""
    mask_token: str = MASK
    """The mask token added when the tokenizer has none."""
    add_mask_token: bool = True
    """Add ``mask_token`` when missing; if False a tokenizer without one is an error."""

    def __post_init__(self):
        if self.vocab_size < 260:
            raise TokenizerError(f"tokenizer.vocab_size={self.vocab_size} must be >= 260 (256 bytes + special tokens)")


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) with EOS, mask and pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, MASK, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, mask_token=MASK, pad_token=PAD)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise TokenizerError(
            f"tokenizer.name_or_path: {name_or_path!r} does not exist; give a tokenizer directory "
            "or a hub name, or leave it unset to train a BPE tokenizer on the data"
        )
    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()) if looks_local else name_or_path)
    except OSError as exc:
        raise TokenizerError(
            f"tokenizer.name_or_path: cannot load {name_or_path!r} ({exc}). Without network "
            "access give a local directory, or leave it unset to train one on the data"
        ) from exc


def prepare_tokenizer(tok: PreTrainedTokenizerBase, cfg: TokenizerConfig) -> PreTrainedTokenizerBase:
    """Make sure ``tok`` has an EOS and a mask token (adding them when allowed)."""
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": EOS})
    if tok.mask_token is None:
        if not cfg.add_mask_token:
            raise TokenizerError(
                f"the tokenizer has no mask token and tokenizer.add_mask_token is false; set "
                f"tokenizer.add_mask_token=true to add {cfg.mask_token!r} (the model's embeddings are resized), "
                "or use a tokenizer that defines mask_token"
            )
        try:
            tok.add_special_tokens({"mask_token": cfg.mask_token})
        except Exception as exc:  # some tokenizers cannot grow
            raise TokenizerError(
                f"could not add mask token {cfg.mask_token!r} to the tokenizer ({exc}); "
                "use a tokenizer that defines mask_token"
            ) from exc
        if tok.mask_token_id is None or tok.mask_token_id == tok.unk_token_id:
            raise TokenizerError(
                f"adding mask token {cfg.mask_token!r} failed (it maps to unk); use a tokenizer that defines mask_token"
            )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
