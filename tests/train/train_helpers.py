"""Shared helpers for the training tests (imported by conftest and the test modules)."""
from __future__ import annotations

import numpy as np

from recursa.config import ModelConfig

VOCAB = 64


def markov_docs(n_docs: int, doc_len: int, seed: int, vocab: int = VOCAB) -> list[list[int]]:
    """Documents from a sparse order-1 Markov chain: far more predictable than its unigram."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(0).dirichlet(np.full(vocab, 0.05), size=vocab)
    docs = []
    for _ in range(n_docs):
        x, doc = int(rng.integers(vocab)), []
        for _ in range(doc_len):
            x = int(rng.choice(vocab, p=table[x]))
            doc.append(x)
        docs.append(doc)
    return docs


def micro_config(**changes) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64)
    return ModelConfig(**{**base, **changes})
