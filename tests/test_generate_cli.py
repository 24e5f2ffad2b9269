"""`dlm generate`: decoders, stop strings, the unmasking replay, and option errors."""

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
    ],
)
def test_generate_with_each_decoder(trained, capsys, extra):
    assert (
        cli_main(["generate", trained, "--prompt", "the model", "--gen-length", "8", "--num-samples", "2", *extra]) == 0
    )
    out = capsys.readouterr().out
    assert out.count("=== 'the model'") == 2


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
