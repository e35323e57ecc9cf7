"""`recursa generate --exit-strategy ...`: the engine's early-exit strategies from the command line."""
import re

import pytest
import torch

from recursa.cli import main
from recursa.cli.generate import STRATEGIES
from recursa.presets import preset
from recursa.data.tokenizer import train_tokenizer
from recursa.engine.config import EXIT_STRATEGIES
from recursa.model import Decoder


@pytest.fixture(scope="module")
def exit_model_dir(tmp_path_factory):
    tok = train_tokenizer(["the cat sat on the mat. " * 40, "once upon a time there was a sea"], vocab_size=300)
    torch.manual_seed(3)
    model = Decoder(preset("tiny", vocab_size=tok.vocab_size, exit_depths=[1, 2], exit_own_norm=True)).eval()
    path = tmp_path_factory.mktemp("exit-model")
    model.save(path)
    tok.save(path)
    return path


def _table(out: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\s+\d+\s+(\d+)\s+'", out, re.M)]


def test_strategies_match_the_engine():
    assert STRATEGIES is EXIT_STRATEGIES  # one definition, imported by the CLI


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_with_exits_reports_depths(exit_model_dir, strategy, capsys):
    # threshold 0: every token after the first exits at the first exit (depth 1)
    assert main(["generate", str(exit_model_dir), "--prompt", "the cat", "--max-tokens", "6",
                 "--exit-strategy", strategy, "--exit-threshold", "0"]) == 0
    out = capsys.readouterr().out
    depths = _table(out)
    assert len(depths) == 6
    if strategy == "speculative":  # drafts that the deep pass rejects are replaced by depth-4 tokens
        assert set(depths) <= {1, 4} and depths[0] == 4
    else:
        assert depths == [4, 1, 1, 1, 1, 1]
    mean = sum(depths) / len(depths)
    assert f"mean depth {mean:.2f} of 4 layers" in out
    assert f"depth 4: {depths.count(4) / 6:.1%}" in out


def test_generate_never_exiting_equals_full_depth_text(exit_model_dir, capsys):
    assert main(["generate", str(exit_model_dir), "--prompt", "once", "--max-tokens", "5",
                 "--exit-strategy", "parallel", "--exit-threshold", "1", "--exit-measure", "margin"]) == 0
    out = capsys.readouterr().out
    assert _table(out) == [4] * 5 and "mean depth 4.00 of 4 layers | tokens per exit: depth 4: 100.0%" in out
    text = out.splitlines()[0]
    assert main(["generate", str(exit_model_dir), "--prompt", "once", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == text  # the engine's full-depth greedy text


@pytest.mark.parametrize("extra, needle", [
    (["--exit-strategy", "copy", "--exit-threshold-kind", "free", "--exit-threshold", "1.5"], "(0, 1)"),
    (["--exit-strategy", "speculative", "--temperature", "1"], "greedy"),
])
def test_bad_values_are_one_line_errors(exit_model_dir, extra, needle, capsys):
    assert main(["generate", str(exit_model_dir), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_model_without_exits_is_an_error(tmp_path, capsys):
    tok = train_tokenizer(["a b c d " * 20], vocab_size=270)
    Decoder(preset("tiny", vocab_size=tok.vocab_size)).save(tmp_path)
    tok.save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "a", "--exit-strategy", "copy"]) == 2
    assert "exit_depths" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "--prompt", "a", "--exit-strategy", "nope"])
    assert e.value.code == 2


@pytest.mark.parametrize("strategy", ["parallel", "copy"])
def test_strategies_run_several_prompts_in_the_engine(exit_model_dir, strategy, capsys):
    args = ["generate", str(exit_model_dir), "--prompt", "the cat", "--prompt", "once upon a time",
            "--max-tokens", "6", "--exit-strategy", strategy, "--exit-threshold", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _table(out) == [4, 1, 1, 1, 1, 1] * 2        # both requests, each token after the first exits at 1
    assert out.count("mean depth 1.50 of 4 layers") == 2


def test_speculative_text_equals_full_depth_for_several_prompts(exit_model_dir, capsys):
    prompts = ["--prompt", "the cat", "--prompt", "once upon a time"]
    assert main(["generate", str(exit_model_dir), *prompts, "--max-tokens", "8"]) == 0
    full = [line for line in capsys.readouterr().out.splitlines() if line]
    assert main(["generate", str(exit_model_dir), *prompts, "--max-tokens", "8", "--exit-strategy", "speculative",
                 "--exit-threshold", "0", "--max-draft", "3"]) == 0
    captured = capsys.readouterr()
    texts = [line for line in captured.out.splitlines() if line.startswith(("the cat", "once upon"))]
    assert texts == full and "drafts accepted" in captured.err


def test_mor_model_reports_router_depths(tmp_path, capsys):
    tok = train_tokenizer(["the cat sat on the mat. " * 40, "once upon a time there was a sea"], vocab_size=300)
    torch.manual_seed(3)
    Decoder(preset("mor-tiny", vocab_size=tok.vocab_size)).save(tmp_path)
    tok.save(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "the cat", "--max-tokens", "5"]) == 0
    depths = _table(capsys.readouterr().out)
    assert len(depths) == 5 and set(depths) <= {4, 6, 8}   # 1 + 2 x (1..3 recursion steps) + 1
