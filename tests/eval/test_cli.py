import json

import numpy as np
import pytest
import torch

from recursa import Decoder, preset
from recursa.cli import main
from recursa.data.packed import read_tokens, write_tokens
from recursa.data.tokenizer import train_tokenizer
from recursa.eval import perplexity


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = train_tokenizer(["the cat sat on the mat. the dog ran, and a cow stood."] * 10, vocab_size=280)
    torch.manual_seed(0)
    Decoder(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=32)).save(d)
    tok.save(d)
    return d


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("recursa eval: error:") and match in err


def test_cli_errors(capsys, tmp_path, toy_cache, model_dir):
    one_line_error(capsys, ["eval", str(tmp_path / "missing"), "--cache", str(toy_cache)], "does not exist")
    one_line_error(capsys, ["eval", str(model_dir), "--tasks", "nope", "--cache", str(toy_cache)], "unknown task 'nope'")
    one_line_error(capsys, ["eval", str(model_dir), "--tasks", "toy", "--limit", "0", "--cache", str(toy_cache)], "--limit")
    one_line_error(capsys, ["eval", str(model_dir), "--tasks", "none"], "nothing to evaluate")
    one_line_error(capsys, ["eval", str(model_dir), "--data", str(tmp_path), "--tasks", "none"], "no prepared 'val' split")


def test_cli_end_to_end(capsys, tmp_path, toy_cache, model_dir):
    rng = np.random.default_rng(0)
    write_tokens(tmp_path / "data", "val", [rng.integers(0, 200, 100).tolist()], vocab_size=280)
    out = tmp_path / "res" / "eval.json"
    argv = ["eval", str(model_dir), "--data", str(tmp_path / "data"), "--tasks", "toy,toy:bpb_0shot",
            "--cache", str(toy_cache), "--json", str(out), "--batch-size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "toy" in printed and "acc_per_char*" in printed
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"toy:rc_0shot", "toy:bpb_0shot"}
    assert res["tasks"]["toy:rc_0shot"]["n_docs"] == 3 and res["tasks"]["toy:bpb_0shot"]["kind"] == "greedy"
    from recursa.model import load

    ref = perplexity(load(model_dir), read_tokens(tmp_path / "data", "val"), seq_len=32, batch_size=5)
    assert res["perplexity"]["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert not list(out.parent.glob("*.tmp"))
    assert main(["eval", "--list-tasks", "--cache", str(toy_cache)]) == 0
    assert "toy" in capsys.readouterr().out
