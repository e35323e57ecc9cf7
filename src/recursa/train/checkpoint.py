"""Training checkpoints: `<out>/checkpoint/` = model.safetensors + config.json + trainer.pt.

model.safetensors/config.json are written by `Decoder.save`, so a checkpoint directory is also a
model directory (`recursa.load(<out>/checkpoint)` works). trainer.pt holds what exact resume needs:
optimizer state, step, data position, elapsed time, RNG states (torch, CUDA, numpy, python) and
the TrainConfig that wrote it.

Atomic: everything is written into a fresh temp directory, the previous checkpoint is renamed to
`checkpoint.old`, the new one renamed into place, then the old one deleted. A kill at any point
leaves either `checkpoint/` or `checkpoint.old/` complete, and `find_checkpoint` takes whichever is.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from recursa.errors import RecursaError
from recursa.io import default_mode, torch_save_atomic
from recursa.model import Decoder
from recursa.model.decoder import WEIGHTS_FILE

CHECKPOINT_DIR, OLD_SUFFIX, TRAINER_FILE = "checkpoint", ".old", "trainer.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (WEIGHTS_FILE, "config.json", TRAINER_FILE))


def find_checkpoint(out: str | os.PathLike) -> Path | None:
    """The complete checkpoint directory under `out`, or None (a half-written temp dir never counts)."""
    out = Path(out)
    for path in (out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + OLD_SUFFIX)):
        if _complete(path):
            return path
    return None


def save_checkpoint(out: str | os.PathLike, model: Decoder, trainer_state: dict) -> Path:
    """Write model + trainer state atomically to `<out>/checkpoint/` (call on rank 0 only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final, old = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + OLD_SUFFIX)
    for stale in out.glob(CHECKPOINT_DIR + ".tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=CHECKPOINT_DIR + ".tmp-", dir=out))
    try:
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it private (0700)
        model.save(tmp)
        torch_save_atomic(trainer_state, tmp / TRAINER_FILE)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: Path) -> dict:
    try:
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file: say which one, not a pickle traceback
        raise RecursaError(f"cannot read {path / TRAINER_FILE}: {e}") from None
