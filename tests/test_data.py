import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import write_corpus
from dlm.data import (
    DataConfig,
    DataError,
    StreamSource,
    TensorSource,
    build_data,
    chat_row,
    load_documents,
    pack,
    pack_column,
    pack_stream,
    stdlib_files,
)
from dlm.tokenizer import TokenizerConfig, TokenizerError, prepare_tokenizer, train_bpe

TOK = TokenizerConfig(vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["def f(x):\n    return x + 1\n", "the model masks tokens and fills them in"] * 20
    return train_bpe(texts, 300)


def test_pack_puts_eos_between_documents_and_drops_the_tail():
    rows = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    docs = [[1] * 5, [2] * 9, [3] * 2, [4] * 7]
    assert [list(r) for r in pack_stream(iter(docs), 6, 0)] == pack(docs, 6, 0).tolist()


def test_pack_column_packs_an_arrow_column_as_pack_packs_lists():
    import pyarrow as pa

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(0, 12, (40,), generator=g)]
    docs[3] = []  # an empty document still ends in EOS
    for seq_len in (1, 4, 7, 64, 10_000):
        chunked = pa.chunked_array([pa.array(docs[:15]), pa.array(docs[15:])])
        assert torch.equal(pack_column(chunked, seq_len, 0), pack(docs, seq_len, 0))
    assert pack_column(pa.array([[]] * 0, type=pa.list_(pa.int64())), 4, 0).shape == (0, 4)
    assert torch.equal(pack_column(pa.array(docs).slice(7, 20), 5, 0), pack(docs[7:27], 5, 0))  # a slice


def tokenise_calls(monkeypatch):
    """Count the tokenizer calls datasets.map makes (none when it reads its cache)."""
    from transformers import PreTrainedTokenizerFast

    calls = []
    original = PreTrainedTokenizerFast.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", counted)
    return calls


def test_a_second_build_reads_the_tokenised_corpus_from_the_datasets_cache(tmp_path, monkeypatch):
    import time

    corpus = write_corpus(tmp_path / "c", n_docs=300)
    cfg = DataConfig(dataset=str(corpus), file_glob="*.txt", seq_len=16, val_fraction=0.1)
    first = build_data(cfg, TOK, seed=0)
    tok = first.tokenizer
    calls = tokenise_calls(monkeypatch)
    started = time.perf_counter()
    again = build_data(cfg, TOK, seed=0, tokenizer=tok)  # a resumed run, or another rank after the main one
    cached = time.perf_counter() - started
    assert calls == [], "a cache hit must not tokenise"
    assert (first.stats["tokens_from_cache"], again.stats["tokens_from_cache"]) == (0.0, 1.0)
    # another process (a rank after the main one, a resumed run) reads the same cache
    script = (
        "import sys; from dlm.data import DataConfig, build_data; from dlm.tokenizer import TokenizerConfig; "
        "from transformers import AutoTokenizer; "
        f"cfg = DataConfig(dataset={str(corpus)!r}, file_glob='*.txt', seq_len=16, val_fraction=0.1); "
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r}); "
        "print(build_data(cfg, TokenizerConfig(vocab_size=300), 0, tokenizer=tok).stats['tokens_from_cache'])"
    )
    tok.save_pretrained(tmp_path / "tok")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "1.0"
    assert torch.equal(again.train.rows["input_ids"], first.train.rows["input_ids"])
    assert torch.equal(again.val["input_ids"], first.val["input_ids"])

    # the rows are those of tokenising the documents one by one and packing them
    def direct(seed, tokenizer):
        docs = load_documents(cfg).shuffle(seed=seed)
        texts = docs.select(range(30, len(docs)))["text"]
        return pack([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], 16, tokenizer.eos_token_id)

    assert torch.equal(first.train.rows["input_ids"], direct(0, tok))
    # another tokenizer, another seed or edited documents are other fingerprints: tokenised anew
    other = prepare_tokenizer(train_bpe(load_documents(cfg)["text"][:50], 280), TOK)
    assert torch.equal(build_data(cfg, TOK, seed=0, tokenizer=other).train.rows["input_ids"], direct(0, other))
    assert torch.equal(build_data(cfg, TOK, seed=1, tokenizer=tok).train.rows["input_ids"], direct(1, tok))
    (corpus / "doc_000.txt").write_text("a changed document\n")
    assert torch.equal(build_data(cfg, TOK, seed=0, tokenizer=tok).train.rows["input_ids"], direct(0, tok))
    started = time.perf_counter()
    two = build_data(DataConfig(**{**cfg.__dict__, "num_proc": 2}), TOK, seed=7, tokenizer=tok)  # two workers
    fresh = time.perf_counter() - started
    assert torch.equal(two.train.rows["input_ids"], direct(7, tok))
    assert cached < fresh, (cached, fresh)


def test_sft_chat_rows_are_read_back_from_the_datasets_cache(tmp_path, tokenizer, monkeypatch):
    """``format: chat`` rows go through the same fingerprinted ``datasets.map``: a second build (a
    resumed run, another rank) reads them back without building a row, equal to building each
    example's row directly (too-long prompts dropped); another seq_len or chat template is mapped anew."""
    import dlm.data as data

    path = tmp_path / "chat.jsonl"
    examples = [{"prompt": f"def f{i}(x):" * (1 + 20 * (i % 7 == 0)), "response": f"return x + {i}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(e) for e in examples))
    cfg = DataConfig(dataset=str(path), format="chat", seq_len=24, val_fraction=0.1)
    tok = prepare_tokenizer(copy.deepcopy(tokenizer), TOK)  # the module's tokenizer stays as it is
    first = build_data(cfg, TOK, 0, tokenizer=tok)

    built = []
    real = data.chat_row
    monkeypatch.setattr(data, "chat_row", lambda *a: built.append(1) or real(*a))
    again = build_data(cfg, TOK, 0, tokenizer=tok)
    assert built == [] and (first.stats["tokens_from_cache"], again.stats["tokens_from_cache"]) == (0.0, 1.0)
    for k in ("input_ids", "loss_mask"):
        assert torch.equal(again.train.rows[k], first.train.rows[k]) and torch.equal(again.val[k], first.val[k])

    def direct(seq_len, tokenizer):
        docs = load_documents(cfg).shuffle(seed=0).select(range(4, 40))
        rows = [
            r for r in (real(ex, tokenizer, DataConfig(**{**cfg.__dict__, "seq_len": seq_len})) for ex in docs) if r
        ]
        return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])

    ids, mask = direct(24, tok)
    assert len(ids) < 36  # some prompts did not fit and were dropped
    assert torch.equal(first.train.rows["input_ids"], ids) and torch.equal(first.train.rows["loss_mask"], mask)
    longer = build_data(DataConfig(**{**cfg.__dict__, "seq_len": 32}), TOK, 0, tokenizer=tok)
    assert longer.stats["tokens_from_cache"] == 0.0 and torch.equal(longer.train.rows["input_ids"], direct(32, tok)[0])
    templated = copy.deepcopy(tok)
    templated.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    other = build_data(cfg, TOK, 0, tokenizer=templated)
    assert other.stats["tokens_from_cache"] == 0.0 and torch.equal(
        other.train.rows["input_ids"], direct(24, templated)[0]
    )


def test_stdlib_corpus_is_found():
    files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)


def test_build_data_splits_by_document_and_adds_a_mask_token(tmp_path):
    corpus = write_corpus(tmp_path / "c", n_docs=30)
    cfg = DataConfig(dataset=str(corpus), file_glob="*.txt", seq_len=16, val_fraction=0.2)
    data = build_data(cfg, TOK, seed=0)
    tok = data.tokenizer
    assert tok.mask_token is not None and tok.eos_token is not None
    assert data.val["input_ids"].shape[1] == 16 and data.train.num_rows > 0
    assert (data.train.rows["input_ids"] == tok.eos_token_id).any()
    assert not (data.train.rows["input_ids"] == tok.mask_token_id).any()
    assert 1 < data.stats["unigram_ppl"] < len(tok)
    again = build_data(cfg, TOK, seed=0, tokenizer=tok)
    assert torch.equal(again.train.rows["input_ids"], data.train.rows["input_ids"])  # same seed, same split


def test_local_jsonl_file(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i} " * 20}) for i in range(20)))
    data = build_data(DataConfig(dataset=str(path), text_field="body", seq_len=16), TOK, 0, tokenizer=tokenizer)
    assert data.train.num_rows > 0
    with pytest.raises(DataError, match="data.text_field='text' is not a column.*body"):
        build_data(DataConfig(dataset=str(path), seq_len=16), TOK, 0, tokenizer=tokenizer)


def test_missing_data_path_is_a_clear_error():
    with pytest.raises(DataError, match="'./no/such/dir' does not exist"):
        build_data(DataConfig(dataset="./no/such/dir"), TOK, 0)
    with pytest.raises(DataError, match="does not exist"):
        build_data(DataConfig(dataset="missing.jsonl"), TOK, 0)


def test_empty_dataset_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files match"):
        build_data(DataConfig(dataset=str(tmp_path / "empty"), file_glob="*.txt"), TOK, 0)
    tiny = write_corpus(tmp_path / "tiny", n_docs=3)
    with pytest.raises(DataError, match="0 training rows of data.seq_len=4096"):
        build_data(DataConfig(dataset=str(tiny), file_glob="*.txt", seq_len=4096), TOK, 0, tokenizer=tokenizer)


def test_tokenizer_without_mask_token_when_adding_is_off(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(TokenizerError, match="no mask token and tokenizer.add_mask_token is false"):
        prepare_tokenizer(bare, TokenizerConfig(add_mask_token=False))
    grown = prepare_tokenizer(bare, TokenizerConfig(mask_token="<|my_mask|>"))
    assert grown.mask_token == "<|my_mask|>" and grown.convert_tokens_to_ids("<|my_mask|>") == grown.mask_token_id


def test_tensor_source_is_a_deterministic_function_of_the_step():
    rows = {"input_ids": torch.arange(40).reshape(10, 4)}
    src = TensorSource(rows, seed=3)
    epoch0 = torch.cat([src.global_batch(s, 5)["input_ids"] for s in range(2)])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 40, 4))  # one epoch sees every row once
    assert torch.equal(src.global_batch(7, 5)["input_ids"], TensorSource(rows, seed=3).global_batch(7, 5)["input_ids"])
    with pytest.raises(DataError, match="fewer than one global batch"):
        src.global_batch(0, 11)


def test_stream_source_replays_to_the_resume_position():
    def make_rows(epoch):
        return ({"input_ids": torch.tensor([epoch, i])} for i in range(7))

    straight = StreamSource(make_rows, 0)
    seq = [straight.global_batch(s, 3)["input_ids"] for s in range(4)]
    resumed = StreamSource(make_rows, 0)
    assert torch.equal(resumed.global_batch(3, 3)["input_ids"], seq[3])
    assert seq[2][:, 0].tolist() == [0, 1, 1]  # rolls into the next epoch


def test_streaming_build_matches_the_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "c", n_docs=20)
    cfg = DataConfig(dataset=str(corpus), file_glob="*.txt", seq_len=16, streaming=True, max_val_sequences=2)
    data = build_data(cfg, TOK, seed=0)
    batch = data.train.global_batch(0, 4)["input_ids"]
    assert batch.shape == (4, 16) and data.val["input_ids"].shape[1] == 16


def test_streaming_rows_equal_pack_of_the_same_documents(tmp_path, tokenizer):
    """Epoch 0 of a streamed corpus is the documents in stream order (sorted files) after the
    ``max_val_sequences`` held-out ones, concatenated with EOS after each document and cut into
    seq_len rows, the tail dropped: exactly ``pack()`` of those documents, row for row. The
    held-out head is the validation set, packed the same way."""
    corpus = write_corpus(tmp_path / "c", n_docs=12)
    cfg = DataConfig(dataset=str(corpus), file_glob="*.txt", seq_len=16, streaming=True, max_val_sequences=2)
    data = build_data(cfg, TOK, seed=0, tokenizer=tokenizer)
    tok = data.tokenizer
    texts = [f.read_text() for f in sorted(corpus.glob("*.txt"))]
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    expected = pack(ids[2:], 16, tok.eos_token_id)
    assert expected.shape[0] > 100
    streamed = torch.stack([row["input_ids"] for row in data.train.make_rows(0)])
    assert torch.equal(streamed, expected)
    assert torch.equal(data.train.global_batch(0, len(expected))["input_ids"], expected)
    assert torch.equal(data.val["input_ids"], pack(ids[:2], 16, tok.eos_token_id)[:2])


def test_chat_rows_mask_the_prompt_and_pad_with_eos(tokenizer):
    cfg = DataConfig(format="chat", seq_len=24)
    ids, loss_mask = chat_row({"prompt": "def f(x):", "response": "return x"}, tokenizer, cfg)
    n_prompt = len(tokenizer("def f(x):", add_special_tokens=False)["input_ids"])
    assert len(ids) == len(loss_mask) == 24
    assert loss_mask[:n_prompt] == [0] * n_prompt and all(loss_mask[n_prompt:])
    assert ids[-1] == tokenizer.eos_token_id
    assert chat_row({"prompt": "x " * 100, "response": "y"}, tokenizer, cfg) is None  # prompt does not fit
    with pytest.raises(DataError, match="needs 'messages' or 'prompt'"):
        chat_row({"question": "q"}, tokenizer, cfg)


def _paragraph_file(path, n: int = 24) -> list[str]:
    from conftest import WORDS

    words = list(WORDS)
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 5)) for i in range(n)]
    path.write_text("\n\n".join(p.replace(" ", "\n", 2) for p in paragraphs) + "\n")  # paragraphs span lines
    return paragraphs


def test_a_txt_file_splits_into_paragraphs_lines_or_one_document(tmp_path):
    from dlm.data import text_unit

    paragraphs = _paragraph_file(tmp_path / "corpus.txt")
    docs = load_documents(DataConfig(dataset=str(tmp_path / "corpus.txt")))
    assert len(docs) == len(paragraphs)  # auto: blank-line paragraphs
    assert [" ".join(d.split()) for d in docs["text"]] == paragraphs
    lines = tmp_path / "words.txt"  # a word list: no blank line, one entry per line
    lines.write_text("alpha\nbeta\n\ngamma\n".replace("\n\n", "\n") + "delta\n")
    assert text_unit(lines, "auto") == "line"
    assert load_documents(DataConfig(dataset=str(lines)))["text"] == ["alpha", "beta", "gamma", "delta"]
    assert len(load_documents(DataConfig(dataset=str(tmp_path / "corpus.txt"), text_split="line"))) > len(paragraphs)
    whole = load_documents(DataConfig(dataset=str(tmp_path / "corpus.txt"), text_split="file"))
    assert len(whole) == 1
    with pytest.raises(DataError, match="text_split"):
        DataConfig(text_split="sentence")


def test_one_huge_document_holds_out_validation_by_rows(tmp_path, tokenizer):
    _paragraph_file(tmp_path / "corpus.txt", n=60)
    cfg = DataConfig(dataset=str(tmp_path / "corpus.txt"), text_split="file", seq_len=16, val_fraction=0.2)
    bundle = build_data(cfg, TOK, 0, tokenizer=tokenizer)
    n_train, n_val = bundle.train.num_rows, bundle.val["input_ids"].shape[0]
    everything = build_data(dataclasses_replace(cfg, val_fraction=0.5), TOK, 0, tokenizer=tokenizer)
    assert n_val == round(0.2 * (n_train + n_val)) and n_train > n_val > 0
    rows = torch.cat([bundle.val["input_ids"], bundle.train.rows["input_ids"]])  # validation rows lead, none repeated
    assert torch.equal(rows, torch.cat([everything.val["input_ids"], everything.train.rows["input_ids"]]))


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_dlm_train_on_a_single_multi_document_txt_file(tmp_path):
    """The commonest user corpus, one .txt file, trains and validates on held-out paragraphs."""
    from conftest import train_tiny

    _paragraph_file(tmp_path / "corpus.txt", n=80)
    run = train_tiny(tmp_path, data={"dataset": str(tmp_path / "corpus.txt"), "file_glob": "**/*.py"})
    log = [json.loads(line) for line in open(f"{run}/log.jsonl")]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert any(r.get("val_ppl", 0) > 1 for r in log)
