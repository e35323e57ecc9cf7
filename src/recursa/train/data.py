"""Training batches: random windows of seq_len + 1 tokens read out of a packed memmap.

Why stateless sampling: the offsets of draw i come from `numpy.random.default_rng([seed, i])`,
so the whole data state is the counter `position`. A checkpoint stores that one integer and a
resumed run draws exactly the windows the uninterrupted run would have drawn.

Distributed: every rank draws the same *global* batch (batch_size * world_size windows) and takes
its own slice, so ranks see distinct windows and a 2-rank run sees the same tokens as a
1-rank run with twice the batch size (the gradient-equality test relies on this).

Validation uses a fixed set of evenly spaced windows from the val split, the same on every eval.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recursa.data.packed import read_header
from recursa.errors import RecursaError


@dataclass
class Batch:
    """inputs/targets [B, T] int64: targets are inputs shifted by one token."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()


def _to_batch(windows: np.ndarray, device) -> Batch:
    t = torch.from_numpy(windows.astype(np.int64))
    if device is not None and torch.device(device).type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        t = t.to(device)
    return Batch(inputs=t[:, :-1].contiguous(), targets=t[:, 1:].contiguous())


class Batches:
    """Reproducible random windows from one packed split; `state_dict()` is the draw counter."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, device=None):
        if tokens.size < seq_len + 2:
            raise RecursaError(f"the train split holds {tokens.size} tokens, fewer than one window of "
                               f"seq_len + 1 = {seq_len + 1}: use a smaller --seq-len or more data")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.position = 0

    def offsets(self, position: int) -> np.ndarray:
        """Start offsets of this rank's windows for draw number `position`."""
        rng = np.random.default_rng([self.seed, position])
        n_global = self.batch_size * self.world_size
        starts = rng.integers(0, self.tokens.size - self.seq_len, size=n_global)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next(self) -> Batch:
        starts = self.offsets(self.position)
        self.position += 1
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return _to_batch(np.asarray(self.tokens[idx]), self.device)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise RecursaError(f"the checkpoint was trained with --seed {state['seed']}, not {self.seed}: "
                               "resume with the same seed")
        self.position = int(state["position"])


def val_windows(tokens: np.ndarray, seq_len: int, n_windows: int) -> np.ndarray:
    """A fixed set of up to n_windows evenly spaced, non-overlapping windows [N, seq_len + 1]."""
    available = (tokens.size - 1) // seq_len
    if available < 1:
        raise RecursaError(f"the val split holds {tokens.size} tokens, fewer than one window of "
                           f"seq_len + 1 = {seq_len + 1}: use a smaller --seq-len or more data")
    n = min(n_windows, available)
    starts = (np.arange(n) * (available // n)) * seq_len
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[idx])


def val_batches(windows: np.ndarray, batch_size: int, rank: int, world_size: int, device=None) -> list[Batch]:
    """This rank's share of the val windows (round-robin), in batches of at most batch_size."""
    mine = windows[rank::world_size]
    return [_to_batch(mine[i:i + batch_size], device) for i in range(0, len(mine), batch_size)]


def unigram_loss(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the train unigram distribution on `targets`.

    Add-one smoothing keeps tokens unseen in train finite. A language model that has learned
    anything beyond token frequencies scores below this.
    """
    counts = np.zeros(vocab_size, dtype=np.float64)
    chunk = 1 << 24
    for i in range(0, train.size, chunk):
        counts += np.bincount(np.asarray(train[i:i + chunk]), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    targets = np.asarray(targets).reshape(-1).astype(np.int64)
    return float(-logp[targets].mean())


def data_vocab_size(directory: str | Path) -> int:
    """vocab_size recorded in the train split's header."""
    return int(read_header(directory, "train")["vocab_size"])
