"""Evaluation (docs/likelihoods.md): ELBO estimators against exact enumeration, rolling windows, the lm-eval
model ``dlm`` end to end on local tasks, and its input errors."""

import logging
import math

import pytest
import torch

from conftest import tiny_model, train_tiny
from dlm.cli import main as cli_main
from dlm.eval.likelihood import Request, elbo, enumerate_elbo

lm_eval = pytest.importorskip("lm_eval")

from dlm.eval.harness import DLMEvalModel, rolling_windows  # noqa: E402
from dlm.eval.tasks import materialize  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return materialize(tmp_path_factory.mktemp("tasks"), count=12, repeat_period=4, repeat_count=2)


def test_mc_elbo_converges_to_enumeration_and_stratification_lowers_variance():
    model = tiny_model(seed=3)
    req = Request(context=[5, 9, 11], target=[7, 20, 33, 2])
    exact = enumerate_elbo(model, req, mask_id=63)
    stds = {}
    for estimator in ("exact_count", "one_over_t"):
        [(value, se)] = elbo(model, [req], 63, mc_num=4096, batch_size=512, estimator=estimator)
        assert abs(value - exact) < 4 * se, (estimator, value, exact, se)
        stds[estimator] = se * math.sqrt(4096)
    assert stds["exact_count"] < stds["one_over_t"]


def test_elbo_batches_requests_of_different_lengths_like_one_at_a_time():
    model = tiny_model(seed=1)
    reqs = [Request([1, 2, 3, 4, 5], [6, 7]), Request([8], [9, 10, 11, 12]), Request([], [13, 14])]
    together = elbo(model, reqs, 63, mc_num=64, batch_size=7, seed=5)
    alone = [elbo(model, [r], 63, mc_num=64, batch_size=64, seed=5)[0] for r in reversed(reqs)][::-1]
    for (a, _), (b, _) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-4)


def test_rolling_windows_score_every_token_once_within_the_window():
    tokens = list(range(100, 123))
    windows = rolling_windows(tokens, prefix=0, max_length=8)
    assert [t for _, target in windows for t in target] == tokens
    assert windows[0][0] == [0]
    for context, target in windows:
        assert len(context) + len(target) <= 8 and context
        if context != [0]:
            start = tokens.index(target[0])
            assert context == ([0] + tokens)[start + 1 - len(context) : start + 1]  # the tokens right before


def test_loglikelihood_rolling_equals_the_windowed_elbo(trained, caplog):
    lm = DLMEvalModel(pretrained=trained, mc_num=2048, batch_size=256, max_length=6)
    text = "the model masks tokens"
    ids = lm.tok_encode(text)
    exact = sum(
        enumerate_elbo(lm.model, Request(c, t), lm.mask_id) for c, t in rolling_windows(ids, lm.eot_token_id, 6)
    )

    class Req:
        args = (text,)

    with caplog.at_level(logging.WARNING):
        [value] = lm.loglikelihood_rolling([Req()])
    assert "lower bound on the log-likelihood" in caplog.text
    assert value == pytest.approx(exact, rel=0.05)


def test_simple_evaluate_on_local_tasks(trained, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = DLMEvalModel(pretrained=trained, mc_num=8, batch_size=4, block_length=8, gen_length=16)
    out = simple_evaluate(
        model=lm,
        tasks=["dlm_repeat", "dlm_repeat_mc", "dlm_stdlib_ppl", "dlm_arithmetic"],
        task_manager=TaskManager(include_path=str(tasks)),
        limit=3,
        log_samples=True,
    )
    results = out["results"]
    assert 0 <= results["dlm_repeat"]["letter_accuracy,none"] <= 1
    assert 0 <= results["dlm_repeat_mc"]["acc,none"] <= 1
    assert results["dlm_stdlib_ppl"]["word_perplexity,none"] > 1
    assert 0 <= results["dlm_arithmetic"]["exact_match,number"] <= 1
    arithmetic = out["samples"]["dlm_arithmetic"]
    assert any(s["resps"][0][0] for s in arithmetic)
    for sample in arithmetic:
        assert "\n" not in sample["resps"][0][0] and " =" not in sample["resps"][0][0]  # cut at the stop sequences
    assert lm.generated_tokens > 0


def test_generate_until_cuts_at_stop_sequences(trained):
    lm = DLMEvalModel(pretrained=trained, batch_size=2, block_length=8)
    free = lm.generate_until([_Inst("the model", {"max_gen_toks": 16, "do_sample": False, "until": []})])[0]
    assert len(free) > 6
    stop = free[3:6]
    cut = lm.generate_until([_Inst("the model", {"max_gen_toks": 16, "do_sample": False, "until": [stop]})])[0]
    assert cut == free[: free.index(stop)]


def test_generate_until_is_greedy_unless_the_task_samples(trained):
    lm = DLMEvalModel(pretrained=trained, batch_size=2, block_length=8)
    default = lm.generate_until([_Inst("the model", {"max_gen_toks": 8, "until": []})])
    greedy = lm.generate_until([_Inst("the model", {"max_gen_toks": 8, "until": [], "do_sample": False})])
    assert default == greedy


def test_generate_until_orders_longest_first_and_returns_in_request_order(trained):
    """Requests with mixed settings and prompt lengths come back in the order asked, each equal to
    decoding it alone (greedy)."""
    lm = DLMEvalModel(pretrained=trained, batch_size=3, block_length=4)
    asks = [
        _Inst("the", {"max_gen_toks": 4, "until": []}),
        _Inst("the model masks tokens and", {"max_gen_toks": 8, "until": []}),
        _Inst("the model masks", {"max_gen_toks": 4, "until": []}),
        _Inst("diffusion runs backwards over time", {"max_gen_toks": 4, "until": []}),
    ]
    together = lm.generate_until(asks)
    alone = [lm.generate_until([a])[0] for a in asks]
    assert together == alone


def test_a_tasks_top_k_and_top_p_reach_the_decoder_and_model_args_win(trained):
    lm = DLMEvalModel(pretrained=trained, block_length=4)
    decoder, until, length = lm._decoder_for({"max_gen_toks": 6, "until": "\n", "top_k": 5, "top_p": 0.9})
    assert (decoder.top_k, decoder.top_p, until, length) == (5, 0.9, ["\n"], 8)
    lm = DLMEvalModel(pretrained=trained, block_length=4, top_k=2)
    assert lm._decoder_for({"max_gen_toks": 4, "top_k": 5})[0].top_k == 2


def test_tok_encode_adds_special_tokens_when_asked(trained):
    """lm-eval's add_special_tokens, else model_args' (default off), reaches the tokenizer."""

    class WithBos:  # a tokenizer that prepends BOS (id 99) when asked
        def __call__(self, text, add_special_tokens):
            return {"input_ids": [99] * add_special_tokens + [len(w) for w in text.split()]}

    plain, with_bos = DLMEvalModel(pretrained=trained), DLMEvalModel(pretrained=trained, add_special_tokens="true")
    plain.tokenizer = with_bos.tokenizer = WithBos()
    assert plain.tok_encode("the model") == [3, 5]
    assert plain.tok_encode("the model", add_special_tokens=True) == [99, 3, 5]
    assert with_bos.tok_encode("the model") == [99, 3, 5]
    assert with_bos.tok_encode("the model", add_special_tokens=False) == [3, 5]


def test_batch_size_auto_takes_the_largest_batch_that_fits(trained, monkeypatch):
    """On a GPU, auto probes full-window forwards from max_batch_size down past each out-of-memory
    error (simulated here: the model refuses batches above 12); on the CPU it is the fixed 8."""
    from dlm.eval.harness import auto_batch_size

    lm = DLMEvalModel(pretrained=trained, batch_size="auto")
    assert lm.batch_size == 8
    assert DLMEvalModel(pretrained=trained, batch_size="auto", max_batch_size=4).batch_size == 4
    tried = []

    class Tight(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            tried.append(input_ids.shape[0])
            if input_ids.shape[0] > 12:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.inner(input_ids=input_ids)

    chosen = auto_batch_size(Tight(lm.model), 16, lm.mask_id, 64)
    assert chosen <= 12 and chosen == tried[-1] and all(t > 12 for t in tried[:-1]) and tried[0] == 64
    with pytest.raises(ValueError, match="batch_size='many'"):
        DLMEvalModel(pretrained=trained, batch_size="many")


def test_dlm_eval_command_writes_scores_and_throughput(trained, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))

    out = tmp_path / "eval.json"
    argv = ["eval", trained, "--tasks", "dlm_arithmetic", "--limit", "4", "--gen-length", "8", "--mc-num", "4"]
    assert cli_main([*argv, "--block-length", "8", "--cache", "dual", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "dlm_arithmetic" in data["results"] and data["throughput"]["generated_tokens"] > 0
    printed = capsys.readouterr().out
    assert "dlm_arithmetic" in printed and "tokens/s" in printed


def test_bad_model_args_are_named(trained, tmp_path):
    with pytest.raises(ValueError, match="unknown model_args mc_nun for the dlm model; valid keys: pretrained,"):
        DLMEvalModel(pretrained=trained, mc_nun=4)
    with pytest.raises(FileNotFoundError, match="no model at .*missing"):
        DLMEvalModel(pretrained=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="decoder='greedy'; choose one of ancestral, confidence, first_hitting"):
        DLMEvalModel(pretrained=trained, decoder="greedy")
    with pytest.raises(ValueError, match="needs pretrained=PATH"):
        DLMEvalModel()


def test_long_context_is_truncated_with_one_warning(trained, caplog):
    lm = DLMEvalModel(pretrained=trained, mc_num=2, batch_size=4, max_length=12, greedy_check=False)
    long = " ".join(["the model"] * 20)
    with caplog.at_level(logging.WARNING):
        out = lm.loglikelihood([_Inst(long, " masks"), _Inst(long, " tokens")])
    assert len(out) == 2 and all(math.isfinite(v) for v, _ in out)
    assert caplog.text.count("longer than the model's window") == 1


class _Inst:
    def __init__(self, *args):
        self.args = args


@pytest.mark.slow
def test_two_process_evaluation_matches_one_process(trained, tasks, tmp_path):
    import json

    from conftest import run_script

    two, one = tmp_path / "two.json", tmp_path / "one.json"
    run_script("dist_eval.py", trained, tasks, two, processes=2)
    run_script("dist_eval.py", trained, tasks, one)
    a, b = json.loads(two.read_text()), json.loads(one.read_text())
    assert (a["world_size"], b["world_size"]) == (2, 1)  # the requests really were split over two ranks
    a, b = a["results"], b["results"]
    assert a.keys() == b.keys()
    for task in b:
        for metric, value in b[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert a[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_lm_eval_command_line_knows_the_dlm_model_and_local_tasks(trained, tmp_path, monkeypatch, capsys):
    from dlm.eval.lm_eval_cli import main as lm_eval_main

    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["lm_eval"])
    args = ["--model", "dlm", "--model_args", f"pretrained={trained},mc_num=2,batch_size=4", "--tasks"]
    lm_eval_main([*args, "dlm_repeat_mc", "--limit", "2"])
    assert "dlm_repeat_mc" in capsys.readouterr().out


def test_unigram_entropy_and_causal_nll():
    from dlm.eval.quality import causal_nll, unigram_entropy

    assert unigram_entropy([[1, 2, 3, 4], [5, 5, 5, 5]]) == pytest.approx((math.log(4) + 0.0) / 2)
    model = tiny_model(attention_mode="causal")
    rows = [[3, 4, 5, 6, 7], [8, 9, 10]]
    nll, n = causal_nll(model, rows, batch_size=2)
    want = 0.0
    for r in rows:
        with torch.no_grad():
            logits = model(torch.tensor([r]), attn_mode="causal").logits[0, :-1]
        want -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r[1:])[:, None]).sum())
    assert n == 6 and nll == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def trained_ar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ar")
    return train_tiny(tmp, objective="ar"), str(tmp / "corpus")


def test_dlm_ppl_on_data_and_generative_with_a_judge(trained, trained_ar, tmp_path, capsys):
    import json

    ar_dir, corpus = trained_ar
    out = tmp_path / "ppl.json"
    data = ["--data", corpus, "--file-glob", "*.txt", "--seq-len", "16", "--max-rows", "4", "--mc-num", "4"]
    assert cli_main(["ppl", trained, *data, "--output", str(out)]) == 0
    assert "NELBO perplexity bound (upper bound)" in capsys.readouterr().out
    record = json.loads(out.read_text())["dataset"]
    assert record["bound"] and record["perplexity"] > 1 and record["tokens"] == 64
    assert cli_main(["ppl", ar_dir, *data]) == 0
    assert "perplexity (exact, causal model)" in capsys.readouterr().out
    gen = ["--judge", ar_dir, "--num-samples", "2", "--gen-length", "8", "--output", str(out)]
    assert cli_main(["ppl", trained, *gen]) == 0
    printed = capsys.readouterr().out
    assert "generative perplexity under" in printed and "unigram entropy" in printed
    g = json.loads(out.read_text())["generative"]
    assert g["generative_perplexity"] > 1 and g["unigram_entropy"] >= 0 and g["edlm"] is None
    edlm = ["--energy", ar_dir, "--candidates", "4", "--steps", "2", "--decoder", "ancestral"]
    assert cli_main(["ppl", trained, *gen, *edlm]) == 0
    assert "energy evaluations, EDLM k=4" in capsys.readouterr().out
    g = json.loads(out.read_text())["generative"]
    assert g["edlm"]["candidates"] == 4 and g["edlm"]["energy_nfe"] == 8  # 4 candidates x 2 parallel steps
    assert cli_main(["ppl", trained]) == 2
    assert "give --data" in capsys.readouterr().err
    assert cli_main(["ppl", trained, "--judge", trained, "--num-samples", "2", "--gen-length", "8"]) == 2
    assert "is a masked-diffusion model (bidirectional attention)" in capsys.readouterr().err


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(trained):
    from dlm.decode import build_decoder

    lm = DLMEvalModel(pretrained=trained, mc_num=2, batch_size=3)
    context = lm.tok_encode("the model masks")
    out = build_decoder("confidence", gen_length=3, steps=3, temperature=0.0, eos_token_id=None)(
        lm.model, torch.tensor([context])
    )
    greedy = out.generated[0].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % lm.mask_id]
    flags = lm._greedy_flags(
        [Request(context, greedy), Request(context, other), Request([5] + context, greedy[:1]), Request(context, [])]
    )
    assert flags[:2] == [True, False] and flags[3] is True


def test_dlm_eval_passes_num_fewshot_and_the_chat_template_to_lm_eval(trained, tmp_path, monkeypatch):
    """The prompts lm-eval built (``--log-samples``) hold two solved examples before the question,
    each turn wrapped in the tokenizer's chat template."""
    import json
    import re
    import shutil
    from functools import partial

    import lm_eval.tasks
    from transformers import AutoTokenizer

    monkeypatch.setenv("DLM_CACHE", str(tmp_path / "cache"))
    # dlm's local tasks only: skip indexing lm-eval's thousands of stock task files (seconds)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", partial(lm_eval.tasks.TaskManager, include_defaults=False))
    ckpt = tmp_path / "chat-model"
    shutil.copytree(f"{trained}/final", ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant> "
    tok.save_pretrained(ckpt)
    out = tmp_path / "eval.json"
    argv = ["eval", str(ckpt), "--tasks", "dlm_arithmetic", "--limit", "2", "--gen-length", "8", "--block-length", "8"]
    assert cli_main([*argv, "--num-fewshot", "2", "--apply-chat-template", "--log-samples", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["n-shot"]["dlm_arithmetic"] == 2
    samples = data["samples"]["dlm_arithmetic"]
    assert len(samples) == 2
    for sample in samples:
        [(context, gen_kwargs)] = sample["arguments"]
        assert context.startswith("<user> ") and context.endswith("<assistant> ")
        turns = re.findall(r"<user> (\d+ \+ \d+ =)\n<assistant> ([^<]*)", context)
        assert len(turns) == 3 and turns[-1] == (sample["doc"]["question"], "")  # 2 shots, then the question
        for question, answer in turns[:2]:  # solved examples of the task
            a, b = map(int, re.findall(r"\d+", question))
            assert int(answer) == a + b


def test_few_shot_examples_never_include_the_evaluated_question(trained, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = DLMEvalModel(pretrained=trained, batch_size=4, block_length=8, gen_length=8)
    out = simple_evaluate(
        model=lm,
        tasks=["dlm_arithmetic"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        num_fewshot=3,
        log_samples=True,
    )
    samples = out["samples"]["dlm_arithmetic"]
    assert len(samples) == 12
    for sample in samples:
        [(context, _)] = sample["arguments"]
        doc = sample["doc"]
        assert context.endswith(doc["question"])
        assert f"{doc['question']} " not in context, sample["doc_id"]  # answered earlier in its own prompt
