"""Validation perplexity over a packed token stream.

The stream is cut into non-overlapping windows of `seq_len` inputs; window w reads tokens
[w*seq_len, (w+1)*seq_len] and predicts the last seq_len of them, so every token after the first
is predicted exactly once (the shorter tail window included). Windows run `batch_size` at a time.

    from recursa.data.packed import read_tokens
    perplexity(model, read_tokens("data/corpus", "val"), seq_len=512, batch_size=8)
    # {'nll': 3.21, 'ppl': 24.8, 'n_tokens': 40959}
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from recursa.errors import RecursaError


def _ids(chunk: np.ndarray, vocab: int) -> torch.Tensor:
    ids = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
    if int(ids.max()) >= vocab:
        raise RecursaError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
    return ids


def _nll_sum(model, windows: torch.Tensor) -> float:
    logits = model(windows[:, :-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()


@torch.inference_mode()
def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_tokens: int | None = None) -> dict:
    """Mean next-token NLL (nats), its exp, and how many tokens were predicted."""
    if seq_len < 1 or batch_size < 1:
        raise RecursaError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if seq_len > model.cfg.max_seq_len:
        raise RecursaError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise RecursaError(f"max_tokens must be positive, got {max_tokens}")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    if n < 2:
        raise RecursaError(f"need at least 2 tokens to measure perplexity, got {n}")
    vocab = model.cfg.vocab_size
    device = model.embed_tokens.weight.device
    n_full = (n - 1) // seq_len
    total = 0.0
    for w0 in range(0, n_full, batch_size):
        w1 = min(w0 + batch_size, n_full)
        flat = _ids(tokens[w0 * seq_len:w1 * seq_len + 1], vocab)
        # neighbouring windows share their boundary token: window w is flat[w*L : (w+1)*L + 1]
        total += _nll_sum(model, flat.unfold(0, seq_len + 1, seq_len).to(device))
    if n - 1 > n_full * seq_len:  # the shorter tail window
        total += _nll_sum(model, _ids(tokens[n_full * seq_len:n], vocab)[None].to(device))
    count = n - 1
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "n_tokens": count}
