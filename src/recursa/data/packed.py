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


def read_header(directory: str | os.PathLike, split: str) -> dict:
    """The JSON header of `split`, checked: dtype, n_tokens and vocab_size of the right kinds."""
    path = Path(directory) / f"{split}.json"
    try:
        header = json.loads(path.read_text())
        dtype = np.dtype(header["dtype"])
        ok = dtype.kind == "u" and all(isinstance(header[k], int) and not isinstance(header[k], bool) and header[k] >= 0
                                       for k in ("n_tokens", "vocab_size"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise RecursaError(f"cannot read {path} ({e}): re-run `recursa data prepare`") from None
    if not ok:
        raise RecursaError(f"{path} is not a packed-split header (dtype, n_tokens, vocab_size): re-run prepare")
    return header


def read_tokens(directory: str | os.PathLike, split: str, check_ids: bool = True) -> np.memmap:
    """The packed stream of `split` as a read-only 1-D memmap.

    A damaged split is one line, not a numpy or embedding error deep inside training: a header
    that does not parse, a .bin whose size is not a whole number of tokens or disagrees with the
    header, an empty split, and (check_ids, one pass over the data) ids outside the vocabulary."""
    directory = Path(directory)
    header_path, path = directory / f"{split}.json", directory / f"{split}.bin"
    if not header_path.is_file() or not path.is_file():
        raise RecursaError(f"no prepared '{split}' split in {directory} (run `recursa data prepare` first)")
    header = read_header(directory, split)
    dtype, size = np.dtype(header["dtype"]), path.stat().st_size
    if size % dtype.itemsize or size // dtype.itemsize != header["n_tokens"]:
        raise RecursaError(f"{path} holds {size} bytes, not the {header['n_tokens']} {dtype.name} tokens its header "
                           f"says: re-run prepare")
    if size == 0:
        raise RecursaError(f"the '{split}' split in {directory} holds no tokens")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if check_ids:
        top = int(tokens.max())
        if top >= header["vocab_size"]:
            raise RecursaError(f"{path} holds token id {top}, outside its vocabulary of {header['vocab_size']}: "
                               f"re-run prepare")
    return tokens
