"""Build a training corpus directory: documents -> train/val split -> tokenizer -> packed streams.

    recursa data prepare --out data/corpus                  # default corpus, trained 8192-token BPE
    recursa data prepare --tokenizer models/smollm2-135m    # reuse a model's tokenizer instead

The output directory holds `train.bin/.json`, `val.bin/.json` (see `recursa.data.packed`),
`tokenizer.json` + `tokenizer_config.json` and `manifest.json` (sources, versions, document and
token counts per split and source, vocabulary, seed). It is built in a temporary sibling
directory and renamed into place at the end, so an interrupted run leaves nothing behind.
The split is by document and depends only on (seed, source, doc id): re-running reproduces it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

from recursa.data.packed import write_tokens
from recursa.data.sources import SOURCES, Document, Source, fetch
from recursa.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from recursa.errors import RecursaError
from recursa.io import check_output_dir

DEFAULT_CACHE = "~/.cache/recursa"
SPLITS = ("train", "val")


def _score(seed: int, doc: Document) -> float:
    """A uniform number in [0, 1) fixed by (seed, source, doc id) alone."""
    digest = hashlib.sha256(f"{seed}\0{doc.source}\0{doc.doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Split by document: a doc goes to val when its hash score is below `val_fraction`.

    Per source, the highest-scoring doc always stays in train (so a one-document source is never
    held out) and, when there are two or more, the lowest-scoring goes to val. Order within each
    split follows the input.
    """
    if not 0.0 < val_fraction < 1.0:
        raise RecursaError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    by_source: dict[str, list[Document]] = defaultdict(list)
    for doc in docs:
        by_source[doc.source].append(doc)
    val_keys = set()
    for group in by_source.values():
        scored = sorted(group, key=lambda d: _score(seed, d))
        chosen = {(d.source, d.doc_id) for d in scored if _score(seed, d) < val_fraction}
        if len(scored) >= 2:
            chosen.add((scored[0].source, scored[0].doc_id))
        chosen.discard((scored[-1].source, scored[-1].doc_id))
        val_keys |= chosen
    train = [d for d in docs if (d.source, d.doc_id) not in val_keys]
    val = [d for d in docs if (d.source, d.doc_id) in val_keys]
    return train, val


def load_documents(sources: Iterable[Source], cache_dir: str | os.PathLike, log: Callable[[str], None] = print) -> list[Document]:
    """Fetch (or find in the cache) every source and read its non-empty documents."""
    docs: list[Document] = []
    for source in sources:
        root = fetch(source, cache_dir, log)
        got = [d for d in source.load(root) if d.text]
        if not got:
            raise RecursaError(f"source {source.name} ({root}) yielded no documents")
        ids = [d.doc_id for d in got]
        if len(set(ids)) != len(ids):
            raise RecursaError(f"source {source.name} has duplicate document ids")
        docs.extend(got)
    return docs


def prepare(
    out: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    tokenizer_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = DEFAULT_CACHE,
    val_fraction: float = 0.02,
    seed: int = 0,
    force: bool = False,
    sources: Sequence[Source] = SOURCES,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Build the corpus at `out` and return its manifest; None (and nothing touched) when `out`
    exists and `force` is false."""
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    if tokenizer_dir is None and (not isinstance(vocab_size, int) or vocab_size < 257):
        raise RecursaError(f"vocab size must be an integer >= 257 (256 bytes + end-of-text), got {vocab_size}")
    if not 0.0 < val_fraction < 1.0:
        raise RecursaError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    given_tok = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    check_output_dir(out)   # a file at --out or above it, an unwritable parent: one line, before any download
    if out.exists() and not force:
        log(f"{out} already exists: skipping (pass --force to rebuild it)")
        return None

    docs = load_documents(sources, cache_dir, log)
    train, val = split_documents(docs, val_fraction, seed)
    if given_tok is None:
        log(f"training a {vocab_size}-token byte-level BPE on {len(train)} train documents")
        tok = train_tokenizer((d.text for d in train), vocab_size)
    else:
        tok = given_tok

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        counts = _write_splits(tmp, tok, {"train": train, "val": val})
        tok.save(tmp)
        manifest = _manifest(sources, counts, tok, tokenizer_dir, val_fraction, seed, val)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    for split in SPLITS:
        s = manifest["splits"][split]
        log(f"{split}: {s['docs']} docs, {s['tokens']:,} tokens")
    log(f"vocab {tok.vocab_size}, wrote {out} in {manifest['seconds']} s")
    return manifest


def _write_splits(directory: Path, tok: Tokenizer, splits: dict[str, list[Document]]) -> dict:
    """Tokenize and pack each split (every doc followed by eos); count docs and tokens per source."""
    counts: dict = {}
    for split, docs in splits.items():
        encoded = tok.encode_batch([d.text for d in docs])
        per_source: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "tokens": 0})
        for doc, ids in zip(docs, encoded):
            per_source[doc.source]["docs"] += 1
            per_source[doc.source]["tokens"] += len(ids) + 1
        write_tokens(directory, split, (ids + [tok.eos_id] for ids in encoded), tok.vocab_size)
        counts[split] = dict(per_source)
    return counts


def _manifest(sources, counts, tok: Tokenizer, tokenizer_dir, val_fraction, seed, val) -> dict:
    split_totals = {
        split: {k: sum(c[k] for c in counts[split].values()) for k in ("docs", "tokens")} for split in SPLITS
    }
    return {
        "sources": [
            {
                "name": s.name,
                "registry": s.registry,
                "package": s.package,
                "version": s.version,
                "license": s.license,
                **{split: counts[split].get(s.name, {"docs": 0, "tokens": 0}) for split in SPLITS},
            }
            for s in sources
        ],
        "splits": split_totals,
        "tokenizer": {
            "trained": tokenizer_dir is None,
            "from": None if tokenizer_dir is None else str(Path(tokenizer_dir).resolve()),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
        },
        "vocab_size": tok.vocab_size,
        "seed": seed,
        "val_fraction": val_fraction,
        "val_docs": [f"{d.source}/{d.doc_id}" for d in val],
    }


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build to `out`; an old `out` (with --force) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
