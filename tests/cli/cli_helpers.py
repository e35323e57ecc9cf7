"""Helpers for the CLI tests: a tiny packed corpus, a micro model directory with a tokenizer, an
unwritable directory, and `run_cases`, which runs many CLI cases in one child process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from recursa.config import ModelConfig
from recursa.data.packed import write_tokens
from recursa.data.tokenizer import train_tokenizer
from recursa.model import Decoder

VOCAB = 64
DRIVER = Path(__file__).with_name("run_many.py")


def run_cases(cases: dict[str, dict], workdir: Path, timeout: float = 600) -> dict[str, dict]:
    """Run {name: {"argv": [...], "fsize": ...}} in one child process; {name: {"rc", "out", "err"}}."""
    spec = workdir / "cases.json"
    spec.write_text(json.dumps(list(cases.values())))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(DRIVER), str(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(cases, json.loads(proc.stdout.splitlines()[-1])))


def unwritable_dir(tmp: Path) -> Path:
    """A directory this process cannot create entries in: mode 0500, or /sys for root (who ignores modes)."""
    if os.geteuid() == 0:
        return Path("/sys")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def corpus(directory: Path, vocab: int = VOCAB, seed: int = 0, top: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    high = top or vocab
    write_tokens(directory, "train", [rng.integers(0, high, 400).tolist() for _ in range(5)], vocab)
    write_tokens(directory, "val", [rng.integers(0, min(high, vocab), 200).tolist() for _ in range(2)], vocab)
    return directory


def model_dir(directory: Path) -> Path:
    """A micro model with a small trained BPE (so `generate` has a tokenizer)."""
    tok = train_tokenizer(["a b c d e f g " * 30], vocab_size=270)
    torch.manual_seed(0)
    Decoder(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                        max_seq_len=64)).save(directory)
    tok.save(directory)
    return directory
