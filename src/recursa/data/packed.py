"""Packed token streams on disk: one flat numpy memmap per split plus a small JSON header.

`<dir>/<split>.bin` holds every document's tokens back to back, each document followed by the
end-of-text id; `<dir>/<split>.json` records dtype, token count and vocabulary size. Training
reads windows out of the memmap without loading the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from recursa.errors import RecursaError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_tokens(directory: str | os.PathLike, split: str, docs: Iterable[Iterable[int]], vocab_size: int) -> Path:
    """Write documents (token-id sequences) as one packed stream, atomically (temp file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    path = directory / f"{split}.bin"
    tmp = path.with_suffix(".bin.tmp")
    n, n_docs = 0, 0
    with open(tmp, "wb") as f:
        for doc in docs:
            arr = np.asarray(list(doc), dtype=dtype)
            f.write(arr.tobytes())
            n += arr.size
            n_docs += 1
    os.replace(tmp, path)
    header = {"dtype": dtype.name, "n_tokens": n, "n_docs": n_docs, "vocab_size": vocab_size}
    tmp_h = directory / f"{split}.json.tmp"
    tmp_h.write_text(json.dumps(header, indent=2) + "\n")
    os.replace(tmp_h, directory / f"{split}.json")
    return path


def read_tokens(directory: str | os.PathLike, split: str) -> np.memmap:
    """The packed stream of `split` as a read-only 1-D memmap."""
    directory = Path(directory)
    header_path, path = directory / f"{split}.json", directory / f"{split}.bin"
    if not header_path.is_file() or not path.is_file():
        raise RecursaError(f"no prepared '{split}' split in {directory} (run `recursa data prepare` first)")
    header = json.loads(header_path.read_text())
    tokens = np.memmap(path, dtype=np.dtype(header["dtype"]), mode="r")
    if tokens.size != header["n_tokens"]:
        raise RecursaError(f"{path} holds {tokens.size} tokens but its header says {header['n_tokens']}: re-run prepare")
    return tokens
