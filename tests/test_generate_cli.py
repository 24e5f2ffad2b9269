"""`dlm generate`: decoders, stop strings, the unmasking replay, and option errors."""

import math
import re

import pytest
import torch

from conftest import train_tiny
from dlm.cli import main as cli_main
from dlm.decode.show import MASKED, render_frames
from dlm.decode.stopping import StopStrings, cut_at_stop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("gen"))


@pytest.mark.parametrize(
    "extra",
    [
        ["--decoder", "ancestral"],
        ["--decoder", "first_hitting", "--tokens-per-call", "2"],
        ["--decoder", "confidence", "--block-length", "4", "--threshold", "0.5"],
        ["--decoder", "confidence", "--factor", "1.0", "--remasking", "margin", "--temperature", "0"],
        ["--decoder", "confidence", "--block-length", "4", "--cache", "dual"],
        ["--decoder", "confidence", "--block-length", "4", "--cache", "prefix", "--threshold", "0.5"],
        ["--decoder", "ancestral", "--cache", "delayed", "--refresh-every", "2"],
        ["--block-length", "2", "--threshold", "0.5", "--open-next-at", "0.5", "--max-open-blocks", "3"],
    ],
)
def test_generate_with_each_decoder(trained, capsys, extra):
    assert (
        cli_main(["generate", trained, "--prompt", "the model", "--gen-length", "8", "--num-samples", "2", *extra]) == 0
    )
    printed = capsys.readouterr()
    assert printed.out.count("=== 'the model'") == 2
    assert "Loading weights" not in printed.err  # transformers' per-load bar stays out of a one-line command


def test_generate_from_a_prompt_file_with_show(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the model\ndef\n")
    assert (
        cli_main(["generate", trained, "--prompt-file", str(prompts), "--gen-length", "8", "--steps", "4", "--show"])
        == 0
    )
    out = capsys.readouterr().out
    assert "[step 1/4]" in out and "[step 4/4]" in out and MASKED in out
    assert "=== 'def'" in out


def test_generate_option_errors(trained, capsys):
    assert cli_main(["generate", trained, "--decoder", "ancestral", "--threshold", "0.9"]) == 2
    assert "--threshold does not apply to --decoder ancestral" in capsys.readouterr().err
    assert cli_main(["generate", trained, "--gen-length", "10", "--block-length", "4"]) == 2
    assert "block_length=4 does not divide gen_length=10" in capsys.readouterr().err
    assert cli_main(["generate", trained, "--cache", "exact", "--gen-length", "8"]) == 2
    assert "cache='exact' needs a block-causal" in capsys.readouterr().err
    assert cli_main(["generate", trained, "--chat", "--prompt", "hi"]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert cli_main(["generate", trained, "--gen-length", "8", "--block-length", "4", "--open-next-at", "0.5"]) == 2
    assert "use the confidence decoder with rule=threshold or rule=factor" in capsys.readouterr().err
    assert cli_main(["generate", trained, "--gen-length", "8", "--threshold", "0.9", "--max-open-blocks", "0"]) == 2
    assert "max_open_blocks=0 must be >= 1" in capsys.readouterr().err


def test_render_frames_shows_masks_and_fills_in():
    class Tok:
        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)

    history = [torch.tensor([[0, 9, 1]]), torch.tensor([[0, 2, 1]])]
    frames = render_frames(history, Tok(), prompt_length=1, mask_token_id=9)
    assert frames == [f"{MASKED}b", "cb"]


def test_stop_strings():
    class Tok:
        mask_token_id = 0

        def decode(self, ids):
            return "".join(chr(96 + i) for i in ids)

    stop = StopStrings(Tok(), ["cd"])
    assert stop(torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1], [3, 0, 4, 0]])).tolist() == [True, False, True]
    assert cut_at_stop("abcdef", ["cd", "ef"]) == "ab"
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(Tok(), [""])


def test_generate_chat_mode_uses_the_chat_template(trained, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    ckpt = tmp_path / "chat-model"
    shutil.copytree(f"{trained}/final", ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant> "
    tok.save_pretrained(ckpt)
    assert cli_main(["generate", str(ckpt), "--chat", "--prompt", "the model", "--gen-length", "8", "--show"]) == 0
    out = capsys.readouterr().out
    assert "<user> the model" in out  # the replay shows the templated prompt


@pytest.fixture
def decoded(monkeypatch):
    """Every decoder `dlm generate` builds, with what it returned: ``[(decoder, DecodeOutput), ...]``."""
    import dlm.decode

    calls = []
    real = dlm.decode.build_decoder

    def build(name, **kwargs):
        decoder = real(name, **kwargs)

        def run(*args, **kw):
            out = decoder(*args, **kw)
            calls.append((decoder, out))
            return out

        return run

    monkeypatch.setattr(dlm.decode, "build_decoder", build)
    return calls


def generate(trained, capsys, *extra: str, prompt: str = "the model") -> tuple[str, int]:
    """The completion `dlm generate` prints for one prompt (16 tokens, blocks of 4), and its NFE."""
    argv = ["generate", trained, "--prompt", prompt, "--gen-length", "16", "--block-length", "4", *extra]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    header, text = out[out.index("=== ") :].split("\n", 1)
    nfe = re.fullmatch(rf"=== {re.escape(repr(prompt))} \(NFE (\d+)\)", header)
    assert nfe and text.startswith(prompt) and text.endswith("\n")
    return text[len(prompt) : -1], int(nfe.group(1))


def test_generate_stop_string_cuts_the_text_and_ends_decoding_early(trained, capsys, decoded):
    from transformers import AutoTokenizer

    free, nfe = generate(trained, capsys, "--temperature", "0")
    assert nfe == 16  # no EOS: every block is decoded
    tok = AutoTokenizer.from_pretrained(f"{trained}/final")
    stop = tok.decode(decoded[-1][1].generated[0, 8:9])  # the first token of the third block
    assert stop and stop in free
    cut, nfe = generate(trained, capsys, "--temperature", "0", "--stop", stop)
    assert cut == free[: free.index(stop)]
    assert nfe <= 12  # the row finished with the block that completed the stop string


def test_generate_seed_top_k_and_top_p_are_honoured(trained, capsys, decoded):
    def tokens(*extra):
        generate(trained, capsys, *extra)
        return decoded[-1][1].generated

    greedy = tokens("--temperature", "0")
    a, again, b = tokens("--seed", "1"), tokens("--seed", "1"), tokens("--seed", "2")
    assert torch.equal(a, again) and not torch.equal(a, b)  # temperature 1 (the default) samples by seed
    assert not torch.equal(a, greedy)
    assert torch.equal(tokens("--seed", "1", "--top-k", "1"), greedy)  # the top-1 token is the argmax
    assert torch.equal(tokens("--seed", "1", "--top-p", "1e-6"), greedy)  # so is the smallest nucleus


def test_generate_cfg_scale_changes_the_greedy_output(trained, capsys, decoded):
    generate(trained, capsys, "--temperature", "0")
    plain = decoded[-1][1].generated
    generate(trained, capsys, "--temperature", "0", "--cfg-scale", "3")
    assert decoded[-1][0].cfg_scale == 3.0 and not torch.equal(decoded[-1][1].generated, plain)


def test_generate_cache_feeds_only_the_block_after_each_refresh(trained, capsys, monkeypatch):
    from dlm.model.modeling import DLMModel

    widths = []
    real_forward = DLMModel.forward

    def forward(self, input_ids, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return real_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(DLMModel, "forward", forward)
    generate(trained, capsys, "--temperature", "0")
    full = set(widths)
    assert len(full) == 1 and min(full) > 16  # the whole canvas (prompt + 16) at every call
    widths.clear()
    _, nfe = generate(trained, capsys, "--temperature", "0", "--cache", "dual")
    assert nfe == 16 and widths.count(max(full)) == 4 and set(widths) == {max(full), 4}  # a refresh per block


def test_generate_tokens_per_call_and_remasking_change_what_is_decoded(trained, capsys, decoded):
    assert generate(trained, capsys, "--decoder", "first_hitting")[1] == 16
    assert generate(trained, capsys, "--decoder", "first_hitting", "--tokens-per-call", "4")[1] == 4
    orders = {}
    for rule in ("confidence", "margin", "entropy", "random"):
        generate(trained, capsys, "--temperature", "0", "--remasking", rule)
        decoder, out = decoded[-1]
        assert decoder.remasking == rule
        orders[rule] = tuple(out.step_map[0, out.prompt_length :].tolist())
    assert len(set(orders.values())) == 4  # each rule decodes the positions in its own order


class FixedLogits(torch.nn.Module):
    """A "model" whose generated positions always predict the same distributions ``probs [G, V]``."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logits = probs.log()

    def forward(self, input_ids, attention_mask=None):
        out = torch.zeros(*input_ids.shape, self.logits.shape[-1])
        out[:, -self.logits.shape[0] :] = self.logits
        return out


def three_positions() -> torch.Tensor:
    """X: (.5, .5) — lowest entropy; Y: .6 + forty tokens of .01 — widest margin;
    Z: (.7, .25, five of .01) — most confident."""
    probs = torch.zeros(3, 64)
    probs[0, :2] = 0.5
    probs[1, 0], probs[1, 1:41] = 0.6, 0.01
    probs[2, 0], probs[2, 1], probs[2, 2:7] = 0.7, 0.25, 0.01
    return probs


@pytest.mark.parametrize(
    "remasking, order",
    [("confidence", ["Z", "Y", "X"]), ("margin", ["Y", "Z", "X"]), ("entropy", ["X", "Z", "Y"])],
)
def test_remasking_rules_decode_the_positions_their_score_ranks_first(remasking, order):
    from dlm.decode import build_decoder
    from dlm.decode.confidence import scores

    probs = three_positions()
    entropy = [math.log(2), -(0.6 * math.log(0.6) + 0.4 * math.log(0.01)), 0]
    entropy[2] = -(0.7 * math.log(0.7) + 0.25 * math.log(0.25) + 0.05 * math.log(0.01))
    expected = {"confidence": [0.5, 0.6, 0.7], "margin": [0.0, 0.59, 0.45], "entropy": [-h for h in entropy]}
    got = scores(probs.log(), probs.argmax(-1), remasking, None)
    assert got.tolist() == pytest.approx(expected[remasking], abs=1e-5)
    dec = build_decoder(
        "confidence", gen_length=3, steps=3, temperature=0.0, remasking=remasking, mask_token_id=63, eos_token_id=None
    )
    out = dec(FixedLogits(probs), torch.tensor([[5, 6]]))
    step_of = dict(zip("XYZ", out.step_map[0, 2:].tolist()))
    assert sorted(step_of, key=step_of.get) == order  # one position per step, best score first
    assert out.generated[0].tolist() == [0, 0, 0]


def test_generate_compile_decodes_with_the_compiled_forward_and_the_same_greedy_text(
    trained, capsys, decoded, monkeypatch
):
    import dlm.decode.blocks
    from dlm.decode.compiled import CompiledForward

    plain, _ = generate(trained, capsys, "--temperature", "0", "--cache", "dual")
    monkeypatch.setattr(dlm.decode.blocks, "backend_of", lambda setting: "eager")  # dynamo's tracing, no inductor
    calls = []
    real_call = CompiledForward.__call__
    monkeypatch.setattr(
        CompiledForward, "__call__", lambda self, *a, **kw: calls.append(1) or real_call(self, *a, **kw)
    )
    compiled, _ = generate(trained, capsys, "--temperature", "0", "--cache", "dual", "--compile")
    assert decoded[-1][0].compile is True and compiled == plain and calls  # decoded through the compiled forward
