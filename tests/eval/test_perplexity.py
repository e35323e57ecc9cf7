import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recursa import Decoder, RecursaError, preset
from recursa.data.packed import read_tokens, write_tokens
from recursa.eval import perplexity


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(preset("tiny", vocab_size=97, max_seq_len=32)).eval()


def reference(model, tokens, seq_len):
    """A plain loop over non-overlapping windows, one window at a time."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, seq_len):
            w = tokens[s:s + seq_len + 1]
            logits = model(w[None, :-1])[0]
            total += F.cross_entropy(logits.double(), w[1:], reduction="sum").item()
            count += len(w) - 1
    return total / count, count


@pytest.mark.parametrize("n,seq_len,batch", [(200, 16, 3), (161, 16, 4), (17, 16, 2), (50, 32, 1)])
def test_perplexity_matches_plain_loop(model, n, seq_len, batch):
    tokens = np.random.default_rng(n).integers(0, 97, n).astype(np.uint16)
    out = perplexity(model, tokens, seq_len=seq_len, batch_size=batch)
    nll, count = reference(model, tokens, seq_len)
    assert out["n_tokens"] == count == n - 1
    assert out["nll"] == pytest.approx(nll, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_max_tokens_and_packed_stream(model, tmp_path):
    rng = np.random.default_rng(1)
    write_tokens(tmp_path, "val", [rng.integers(0, 97, 70).tolist(), rng.integers(0, 97, 50).tolist()], vocab_size=97)
    tokens = read_tokens(tmp_path, "val")
    out = perplexity(model, tokens, seq_len=32, batch_size=2, max_tokens=64)
    nll, count = reference(model, np.asarray(tokens[:65]), 32)
    assert out["n_tokens"] == count == 64
    assert out["nll"] == pytest.approx(nll, rel=1e-5)


def test_bad_input(model):
    with pytest.raises(RecursaError, match="vocabulary"):
        perplexity(model, np.array([1, 2, 500]), seq_len=8)
    with pytest.raises(RecursaError, match="max_seq_len"):
        perplexity(model, np.arange(10), seq_len=64)
    with pytest.raises(RecursaError, match="at least 2"):
        perplexity(model, np.arange(1), seq_len=8)
