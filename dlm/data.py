"""Training data: load documents with ``datasets``, tokenise, pack, and serve global batches.

Sources (``data.dataset``):

* ``stdlib`` — the source files of the running Python's standard library: present on every
  machine, no download (the quickstart's corpus);
* a local directory (files matching ``data.file_glob``, one document per file) or a local
  ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file;
* any HF hub dataset name (``data.dataset_config``, ``data.split``);
* ``task:NAME`` — a generated task from :mod:`dlm.tasks` or any reasoning-gym dataset
  (``data.task_args``; ``max_documents`` examples, default 10000), with ``prompt`` / ``response``
  fields for ``format: chat``.

``format: text`` packs documents into rows of ``seq_len`` tokens with EOS between documents.
``format: chat`` builds SFT rows (prompt + answer + EOS padding) with a ``loss_mask`` over the
answer, using the tokenizer's chat template when it has one.

Batches are served by index, not by iterator state: global batch ``s`` is a fixed function of
``(seed, s)``. Every rank builds the same global batch and keeps its own rows, so resuming at
step ``s`` and running on N processes both reproduce a single uninterrupted run exactly.
With ``streaming: true`` nothing is held in memory; resuming replays the stream to the
right position.
"""

from __future__ import annotations

import json
import logging
import math
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dlm.tokenizer import TokenizerConfig, load_tokenizer, prepare_tokenizer, train_bpe

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """The data settings cannot produce training batches; the message says how to fix it."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "stdlib"
    """``stdlib``, a local file or directory, or an HF hub dataset name."""
    dataset_config: str | None = None
    """Hub dataset configuration name (e.g. ``wikitext-103-raw-v1``)."""
    split: str = "train"
    """Split of a hub dataset to read."""
    text_field: str = "text"
    """Column holding the text (format: text)."""
    file_glob: str = "**/*.py"
    """Files to read from a local directory, one document each."""
    text_split: Literal["auto", "file", "paragraph", "line"] = "auto"
    """How a local ``.txt`` file splits into documents: ``paragraph`` (blank-line separated),
    ``line``, or ``file`` (the whole file is one). ``auto``: paragraphs, or lines when the file has
    no blank line. A directory's (and stdlib's) files are one document each. With one document, the
    validation rows are held out by rows instead."""
    format: Literal["text", "chat"] = "text"
    """``text``: packed pretraining rows; ``chat``: prompt/answer rows for SFT."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    """format: chat reads ``messages`` (a list of {role, content}) or else prompt/response."""
    seq_len: int = 256
    """Tokens per training row."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (by document, never split mid-document)."""
    max_val_sequences: int = 256
    """Cap on validation rows, to keep periodic validation cheap. With streaming, this many
    leading documents of the stream are held out for validation (the size is unknown up front)."""
    max_documents: int | None = None
    """Use only this many documents (after a seeded shuffle)."""
    streaming: bool = False
    """Stream the corpus instead of loading it (for corpora larger than memory)."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """Arguments of a generated task (``dataset: task:NAME``)."""
    num_proc: int | None = None
    """Worker processes for tokenising (``datasets.map(num_proc=...)``); the result is cached
    either way."""

    def __post_init__(self):
        if self.seq_len < 2:
            raise DataError(f"data.seq_len={self.seq_len} must be at least 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction={self.val_fraction} must lie strictly between 0 and 1")
        if self.max_documents is not None and self.max_documents < 2:
            raise DataError(f"data.max_documents={self.max_documents} must be at least 2 (train + validation)")
        if self.text_split not in ("auto", "file", "paragraph", "line"):
            raise DataError(f"data.text_split={self.text_split!r}; choose auto, file, paragraph or line")
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"data.num_proc={self.num_proc} must be at least 1 (or null: one process)")


def stdlib_files(glob: str = "**/*.py") -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "__pycache__", "dist-packages"}
    return sorted(str(p) for p in root.glob(glob) if p.is_file() and not skip & set(p.parts))


def _is_local(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or Path(name).suffix in LOCAL_SUFFIXES
        or Path(name).expanduser().exists()
    )


def text_unit(path: Path, text_split: str) -> str:
    """``datasets``' ``sample_by`` for a ``.txt`` file: the setting, or for ``auto`` paragraphs
    when the file has a blank line (read in chunks, never whole) and lines otherwise."""
    if text_split != "auto":
        return {"file": "document"}.get(text_split, text_split)
    tail = ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), ""):
            text = (tail + chunk).replace("\r\n", "\n")
            if "\n\n" in text:  # the separator datasets' paragraph split uses
                return "paragraph"
            tail = text[-1:]
    return "line"


def load_documents(cfg: DataConfig, streaming: bool = False):
    """A ``datasets`` Dataset (or IterableDataset when streaming) of raw documents."""
    from datasets import load_dataset

    name = cfg.dataset
    if name.startswith("task:"):
        from datasets import Dataset

        from dlm.tasks import generate

        try:
            rows = generate(name[5:], cfg.max_documents or 10000, seed=0, **cfg.task_args)
        except ValueError as exc:
            raise DataError(f"data.dataset {name!r}: {exc}") from None
        # reasoning-gym examples also carry the scorer's ``entry`` (nested, per-dataset metadata): SFT needs
        # only the text fields
        ds = Dataset.from_list([{k: v for k, v in row.items() if k != "entry"} for row in rows])
        return ds.to_iterable_dataset() if streaming else ds
    if name == "stdlib" or (_is_local(name) and Path(name).expanduser().is_dir()):
        files = (
            stdlib_files(cfg.file_glob)
            if name == "stdlib"
            else sorted(str(p) for p in Path(name).expanduser().glob(cfg.file_glob) if p.is_file())
        )
        if not files:
            where = "the Python standard library" if name == "stdlib" else name
            raise DataError(
                f"data.dataset: no files match data.file_glob={cfg.file_glob!r} in {where}; "
                "check the directory and the glob"
            )
        return load_dataset(
            "text",
            data_files={"train": files},
            sample_by="document",
            encoding_errors="replace",
            split="train",
            streaming=streaming,
        )
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(
                f"data.dataset: {name!r} does not exist; give an existing file or directory, "
                "'stdlib', or a hub dataset name"
            )
        builder = LOCAL_SUFFIXES.get(path.suffix)
        if builder is None:
            raise DataError(f"data.dataset: cannot read {path.suffix!r} files; use one of {', '.join(LOCAL_SUFFIXES)}")
        kwargs: dict[str, Any] = {"sample_by": text_unit(path, cfg.text_split)} if builder == "text" else {}
        docs = load_dataset(builder, data_files={"train": str(path)}, split="train", streaming=streaming, **kwargs)
        if kwargs.get("sample_by") in ("paragraph", "line"):  # blank lines and paragraphs are no documents
            docs = docs.filter(lambda ex: bool(ex["text"].strip()))
        return docs
    try:
        return load_dataset(name, cfg.dataset_config, split=cfg.split, streaming=streaming)
    except Exception as exc:
        raise DataError(
            f"data.dataset: cannot load hub dataset {name!r} ({type(exc).__name__}: {exc}). Without "
            "network access use 'stdlib' or a local file or directory"
        ) from exc


# ----------------------------------------------------------------------------- rows


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int) -> Tensor:
    """Concatenate documents with EOS after each and cut into ``[N, seq_len]`` (the tail is dropped)."""
    lengths = [len(ids) + 1 for ids in token_lists]
    flat = np.empty(sum(lengths), dtype=np.int64)
    pos = 0
    for ids, n in zip(token_lists, lengths):
        flat[pos : pos + n - 1] = ids
        flat[pos + n - 1] = eos_id
        pos += n
    n_rows = len(flat) // seq_len
    return torch.from_numpy(flat[: n_rows * seq_len].reshape(n_rows, seq_len).copy())


def pack_column(column, seq_len: int, eos_id: int) -> Tensor:
    """``pack`` of an arrow list column of token ids, without making Python lists of it."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    offsets = column.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]  # a sliced array's offsets index its parent's values
    values = column.flatten().to_numpy().astype(np.int64)
    n_docs = len(offsets) - 1
    flat = np.empty(len(values) + n_docs, dtype=np.int64)
    eos_at = offsets[1:] + np.arange(n_docs)  # document i's EOS follows its tokens and i earlier EOS
    is_token = np.ones(len(flat), dtype=bool)
    is_token[eos_at] = False
    flat[is_token], flat[eos_at] = values, eos_id
    n_rows = len(flat) // seq_len
    return torch.from_numpy(flat[: n_rows * seq_len].reshape(n_rows, seq_len).copy())


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides a tokenizer's ids (its full serialisation)."""
    import hashlib

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and added tokens
        text = json.dumps([sorted(tok.get_vocab().items()), [str(t) for t in tok.all_special_tokens]])
    return hashlib.sha256(f"{type(tok).__name__}|{text}".encode()).hexdigest()


def cached_map(docs, fn, key: list, desc: str, num_proc=None):
    """``docs.map(fn, batched=True, num_proc=…)`` under a fingerprint of ``key`` and the documents'
    own (datasets derives it from the files, the shuffle seed and the selection), so that for a
    corpus datasets keeps on disk (local files, stdlib, the hub) a second run, a resumed run and
    the other processes — which build their data after the main process — read the result back
    instead of computing it again. (A generated ``task:`` corpus lives in memory: it is mapped each
    time.) Returns the mapped dataset and whether it was read from the cache."""
    import os
    import time

    from datasets.fingerprint import Hasher

    started = time.time()
    out = docs.map(
        fn,
        batched=True,
        batch_size=256,
        num_proc=num_proc,
        remove_columns=docs.column_names,
        new_fingerprint=Hasher.hash([*key, docs._fingerprint]),
        desc=desc,
    )
    files = [f["filename"] for f in out.cache_files]
    return out, bool(files) and all(os.path.getmtime(f) < started for f in files)  # written before this call


def tokenised_rows(
    docs, tok: PreTrainedTokenizerBase, column: str, seq_len: int, desc: str, num_proc=None
) -> tuple[Tensor, bool]:
    """Packed rows of ``docs[column]``, tokenised through :func:`cached_map` (keyed by the
    tokenizer and the column). Returns the rows and whether they were read from the cache."""

    def encode(batch):
        return {"input_ids": tok(batch[column], add_special_tokens=False, verbose=False)["input_ids"]}

    ids, cached = cached_map(docs, encode, ["dlm-tokenise-1", tokenizer_fingerprint(tok), column], desc, num_proc)
    return pack_column(ids.data.column("input_ids"), seq_len, tok.eos_token_id), cached


def pack_stream(token_lists: Iterator[list[int]], seq_len: int, eos_id: int) -> Iterator[list[int]]:
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        buf.append(eos_id)
        start = 0
        while len(buf) - start >= seq_len:
            yield buf[start : start + seq_len]
            start += seq_len
        del buf[:start]


def prompt_token_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """A prompt's token ids: the chat template with the generation prompt when the tokenizer has
    one, else the messages' contents joined by newlines. SFT rows and RL prompts both use this, so
    a model is prompted the way it was trained."""
    if tok.chat_template:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tok("\n".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token lists as a left-padded batch ``(input_ids, attention_mask)`` (what the decoders take)."""
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, q in enumerate(seqs):
        if q:
            ids[row, width - len(q) :], mask[row, width - len(q) :] = torch.tensor(q), 1
    return ids, mask


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: list[str], system_prompt: str = "") -> tuple[Tensor, Tensor]:
    """Task prompts as a left-padded batch, formatted as SFT rows format them (chat template when
    the tokenizer has one, after an optional system message): what RL rollouts and task
    benchmarks feed the decoders."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    seqs = [prompt_token_ids(tok, [*system, {"role": "user", "content": p}]) for p in prompts]
    return left_pad(seqs, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def chat_row(
    example: dict[str, Any], tok: PreTrainedTokenizerBase, cfg: DataConfig
) -> tuple[list[int], list[int]] | None:
    """One SFT row: ``(input_ids, loss_mask)`` of length seq_len, or None if the prompt does not fit."""
    if cfg.messages_field in example and example[cfg.messages_field]:
        messages = example[cfg.messages_field]
        prompt_msgs, answer = messages[:-1], messages[-1]["content"]
    else:
        if cfg.prompt_field not in example or cfg.response_field not in example:
            raise DataError(
                f"format: chat needs {cfg.messages_field!r} or {cfg.prompt_field!r} + "
                f"{cfg.response_field!r} fields; this example has {sorted(example)}"
            )
        prompt_msgs = [{"role": "user", "content": example[cfg.prompt_field]}]
        answer = example[cfg.response_field]
    prompt_ids = prompt_token_ids(tok, prompt_msgs)
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(prompt_ids) >= cfg.seq_len:
        return None
    ids = (prompt_ids + answer_ids)[: cfg.seq_len]
    pad = cfg.seq_len - len(ids)
    ids = ids + [tok.eos_token_id] * pad
    loss_mask = [0] * len(prompt_ids) + [1] * (cfg.seq_len - len(prompt_ids))
    return ids, loss_mask


def tokenize_texts(tok: PreTrainedTokenizerBase, texts: list[str], desc: str, chunk: int = 256) -> list[list[int]]:
    out: list[list[int]] = []
    for start in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", leave=False):
        out.extend(tok(texts[start : start + chunk], add_special_tokens=False, verbose=False)["input_ids"])
    return out


# ----------------------------------------------------------------------------- batch sources


class TensorSource:
    """In-memory rows; global batch ``s`` comes from the seeded permutation of its epoch."""

    def __init__(self, rows: dict[str, Tensor], seed: int):
        self.rows, self.seed = rows, seed
        self.num_rows = next(iter(rows.values())).shape[0]

    def global_batch(self, step: int, size: int) -> dict[str, Tensor]:
        if self.num_rows < size:
            raise DataError(
                f"the training set has {self.num_rows} rows, fewer than one global batch ({size}); "
                "use more data, a smaller data.seq_len, or a smaller batch"
            )
        per_epoch = self.num_rows // size
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        idx = perm[i * size : (i + 1) * size]
        return {k: v[idx] for k, v in self.rows.items()}


class StreamSource:
    """Rows packed on the fly from a streamed corpus; resumes by replaying to the position."""

    def __init__(self, make_rows, seed: int):
        self.make_rows, self.seed = make_rows, seed  # make_rows(epoch) -> iterator of row dicts
        self._iter: Iterator[dict[str, Tensor]] | None = None
        self._next = 0  # index of the next row the iterator yields
        self._epoch = 0

    def _restart(self, epoch: int) -> None:
        self._iter, self._epoch = self.make_rows(epoch), epoch

    def _take(self) -> dict[str, Tensor]:
        if self._iter is None:
            self._restart(0)
        for _ in range(2):
            try:
                row = next(self._iter)
                self._next += 1
                return row
            except StopIteration:
                if self._next == 0:
                    raise DataError(
                        "the streamed training set is empty; check data.dataset and data.text_field"
                    ) from None
                self._restart(self._epoch + 1)
        raise DataError("the streamed training set yields no rows")

    def global_batch(self, step: int, size: int) -> dict[str, Tensor]:
        target = step * size
        if target < self._next or self._iter is None:
            self._restart(0)
            self._next = 0
        while self._next < target:  # replay after a resume
            self._take()
        rows = [self._take() for _ in range(size)]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@dataclass
class DataBundle:
    tokenizer: PreTrainedTokenizerBase
    train: TensorSource | StreamSource
    val: dict[str, Tensor]
    stats: dict[str, float] = field(default_factory=dict)


def unigram_perplexity(train_ids: Tensor, val_ids: Tensor, vocab_size: int) -> float:
    """Perplexity of a context-free (unigram) model fitted on the training tokens, add-one smoothed."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[val_ids.flatten()].mean().item())


def build_data(
    cfg: DataConfig, tok_cfg: TokenizerConfig, seed: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> DataBundle:
    """Load, split, tokenise (training a tokenizer when none is given) and pack."""
    docs = load_documents(cfg, streaming=cfg.streaming)
    if cfg.streaming:
        return _build_streaming(docs, cfg, tok_cfg, seed, tokenizer)
    if len(docs) == 0:
        raise DataError(f"data.dataset {cfg.dataset!r} has no documents; point it at a non-empty dataset")
    docs = docs.shuffle(seed=seed)
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    by_rows = len(docs) == 1 and cfg.format == "text"  # one huge document: hold out rows, not documents
    if len(docs) < 2 and not by_rows:
        raise DataError(
            f"data.dataset {cfg.dataset!r} has {len(docs)} document(s); need at least 2 "
            "(one is held out for validation)"
        )
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    if by_rows:
        val_docs = train_docs = docs
    else:
        val_docs, train_docs = docs.select(range(n_val)), docs.select(range(n_val, len(docs)))

    if cfg.format == "text":
        if cfg.text_field not in docs.column_names:
            raise DataError(
                f"data.text_field={cfg.text_field!r} is not a column of {cfg.dataset!r}; "
                f"columns: {', '.join(docs.column_names)}"
            )
    if tokenizer is None:  # trained on the training text (chat: its prompts and answers)
        if tok_cfg.name_or_path is not None:
            texts = []
        else:
            texts = train_docs[cfg.text_field] if cfg.format == "text" else _chat_texts(train_docs, cfg)
        tokenizer = _make_tokenizer(tok_cfg, texts)
    tok = prepare_tokenizer(tokenizer, tok_cfg)

    if by_rows:  # one tokenisation; its leading rows are validation
        rows, hit = tokenised_rows(docs, tok, cfg.text_field, cfg.seq_len, "tokenising", cfg.num_proc)
        n_val = min(max(1, round(cfg.val_fraction * rows.shape[0])), rows.shape[0] - 1)
        train_rows, val_rows, from_cache = {"input_ids": rows[n_val:]}, {"input_ids": rows[:n_val]}, hit
    elif cfg.format == "text":
        (train_ids, train_hit), (val_ids, val_hit) = (
            tokenised_rows(part, tok, cfg.text_field, cfg.seq_len, f"tokenising {name}", cfg.num_proc)
            for part, name in ((train_docs, "train"), (val_docs, "val"))
        )
        train_rows, val_rows = {"input_ids": train_ids}, {"input_ids": val_ids}
        from_cache = train_hit and val_hit
    else:
        (train_rows, train_hit), (val_rows, val_hit) = (
            _chat_rows(part, tok, cfg, f"tokenising {name}") for part, name in ((train_docs, "train"), (val_docs, "val"))
        )
        from_cache = train_hit and val_hit
    n_train = train_rows["input_ids"].shape[0]
    if n_train == 0:
        raise DataError(
            f"data.dataset {cfg.dataset!r} produced 0 training rows of data.seq_len={cfg.seq_len} "
            "tokens; use more data or a smaller data.seq_len"
        )
    if val_rows["input_ids"].shape[0] == 0:
        raise DataError(
            f"the validation split ({n_val} documents) produced 0 rows of {cfg.seq_len} tokens; "
            "raise data.val_fraction or lower data.seq_len"
        )
    val_rows = {k: v[: cfg.max_val_sequences] for k, v in val_rows.items()}
    stats = {
        "train_rows": float(n_train),
        "val_rows": float(val_rows["input_ids"].shape[0]),
        "train_tokens": float(train_rows["input_ids"].numel()),
        "unigram_ppl": unigram_perplexity(train_rows["input_ids"], val_rows["input_ids"], len(tok)),
        "tokens_from_cache": float(from_cache),
    }
    return DataBundle(tok, TensorSource(train_rows, seed), val_rows, stats)


def _make_tokenizer(cfg: TokenizerConfig, texts: list[str]) -> PreTrainedTokenizerBase:
    if cfg.name_or_path is not None:
        return load_tokenizer(cfg.name_or_path)

    def limited() -> Iterator[str]:
        seen = 0
        for text in texts:
            if seen >= cfg.train_max_bytes:
                return
            seen += len(text)
            yield text

    log.info("training a %d-token byte-level BPE tokenizer on the training text", cfg.vocab_size)
    return train_bpe(limited(), cfg.vocab_size)


def _chat_texts(docs, cfg: DataConfig) -> list[str]:
    out = []
    for ex in docs:
        if cfg.messages_field in ex and ex[cfg.messages_field]:
            out.extend(m["content"] for m in ex[cfg.messages_field])
        else:
            out.extend([ex.get(cfg.prompt_field, ""), ex.get(cfg.response_field, "")])
    return out


def _chat_rows(docs, tok: PreTrainedTokenizerBase, cfg: DataConfig, desc: str) -> tuple[dict[str, Tensor], bool]:
    """SFT rows (``input_ids``, ``loss_mask``) of ``docs`` through :func:`cached_map` (keyed by the
    tokenizer, its chat template, the fields and ``seq_len``), and whether they came from the cache."""

    def encode(batch):
        rows = [chat_row(dict(zip(batch, values)), tok, cfg) for values in zip(*batch.values())]
        empty = [0] * cfg.seq_len
        return {
            "input_ids": [r[0] if r else empty for r in rows],
            "loss_mask": [r[1] if r else empty for r in rows],
            "kept": [r is not None for r in rows],
        }

    fields = [cfg.messages_field, cfg.prompt_field, cfg.response_field, cfg.seq_len]
    key = ["dlm-chat-1", tokenizer_fingerprint(tok), str(tok.chat_template), *fields]
    mapped, cached = cached_map(docs, encode, key, desc, cfg.num_proc)
    table = mapped.with_format("torch")[:]  # every column as one tensor
    kept = table["kept"].bool()
    ids, mask = (table[k].long().reshape(len(kept), cfg.seq_len) for k in ("input_ids", "loss_mask"))
    if int(kept.sum()) < len(kept):
        log.warning(
            "dropped %d of %d examples whose prompt is longer than data.seq_len=%d",
            len(kept) - int(kept.sum()),
            len(kept),
            cfg.seq_len,
        )
    return {"input_ids": ids[kept], "loss_mask": mask[kept]}, cached


def _build_streaming(
    docs, cfg: DataConfig, tok_cfg: TokenizerConfig, seed: int, tokenizer: PreTrainedTokenizerBase | None
) -> DataBundle:
    if cfg.format != "text":
        raise DataError("data.streaming is supported for format: text; load chat data without streaming")
    n_val_docs = max(1, cfg.max_val_sequences)  # the first documents of the stream are held out
    val_texts = [ex[cfg.text_field] for ex in docs.take(n_val_docs)]
    if not val_texts:
        raise DataError(f"the streamed dataset {cfg.dataset!r} is empty")
    train_docs = docs.skip(n_val_docs)
    if tokenizer is None:
        sample = (ex[cfg.text_field] for ex in train_docs)
        tokenizer = _make_tokenizer(tok_cfg, sample)  # type: ignore[arg-type]
    tok = prepare_tokenizer(tokenizer, tok_cfg)
    val_rows = {"input_ids": pack(tokenize_texts(tok, val_texts, "tokenising val"), cfg.seq_len, tok.eos_token_id)}
    if val_rows["input_ids"].shape[0] == 0:
        raise DataError(f"the held-out stream documents produced 0 rows of {cfg.seq_len} tokens; lower data.seq_len")
    val_rows = {k: v[: cfg.max_val_sequences] for k, v in val_rows.items()}

    def make_rows(epoch: int) -> Iterator[dict[str, Tensor]]:
        stream = train_docs.shuffle(seed=seed + epoch, buffer_size=1000) if epoch > 0 else train_docs
        ids = (tok(ex[cfg.text_field], add_special_tokens=False, verbose=False)["input_ids"] for ex in stream)
        for row in pack_stream(ids, cfg.seq_len, tok.eos_token_id):
            yield {"input_ids": torch.tensor(row)}

    return DataBundle(tok, StreamSource(make_rows, seed), val_rows, {"val_rows": float(val_rows["input_ids"].shape[0])})
