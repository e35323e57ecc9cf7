"""Fixtures for training tests: a tiny learnable packed corpus and a micro model directory."""
from __future__ import annotations

import json

import pytest
import torch

from recursa.data.packed import write_tokens
from recursa.model import Decoder
from train_helpers import VOCAB, markov_docs, micro_config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    write_tokens(d, "train", markov_docs(60, 100, seed=1), VOCAB)
    write_tokens(d, "val", markov_docs(12, 100, seed=2), VOCAB)
    (d / "tokenizer.json").write_text(json.dumps({"stand_in": True}))
    return d


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    Decoder(micro_config()).save(d)
    return d


@pytest.fixture(scope="session")
def relaxed_model_dir(tmp_path_factory):
    """A relaxed recursive micro model: 2 unique layers looped twice, rank-2 LoRA per loop."""
    d = tmp_path_factory.mktemp("relaxed")
    torch.manual_seed(0)
    model = Decoder(micro_config(n_layers=4, sharing="cycle", n_loops=2, lora_rank_attn=2, lora_rank_mlp=2))
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter for the gradient check
        for name, p in model.named_parameters():
            if name.startswith("lora."):
                p.normal_(std=0.05)
    model.save(d)
    return d
