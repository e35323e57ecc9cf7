"""Tokenizers: train a byte-level BPE on a corpus, or load any HuggingFace `tokenizer.json`.

`Tokenizer` is a thin wrapper over `tokenizers.Tokenizer` that knows its end-of-text and
begin-of-text ids. A saved tokenizer is a directory holding `tokenizer.json` and an
HF-compatible `tokenizer_config.json`, so `transformers.AutoTokenizer.from_pretrained(dir)`
loads the same thing, and a model directory written by HF `save_pretrained` loads here.

    tok = train_tokenizer(texts, vocab_size=8192)   # byte-level BPE, `<|endoftext|>` is id 0
    tok.save("data/corpus"); tok = load_tokenizer("data/corpus")
    assert tok.decode(tok.encode(s)) == s

`encode` never adds special tokens: callers that want a BOS prepend `bos_id` themselves.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from recursa.errors import RecursaError
from recursa.io import write_text_atomic

EOS_TOKEN = "<|endoftext|>"
N_BYTES = 256
# transformers' "no limit" value for model_max_length: the tokenizer itself has no context length.
_NO_MAX_LENGTH = int(1e30)


class Tokenizer:
    """Text <-> token ids, with the ids of the special tokens a language model needs."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token: str, bos_token: str | None = None, config: dict | None = None):
        self._tok = tokenizer
        self._config = dict(config or {})
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = self._token_id(eos_token, "eos_token")
        self.bos_id = None if bos_token is None else self._token_id(bos_token, "bos_token")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: str, role: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise RecursaError(f"tokenizer has no token {token!r} (its {role})")
        return idx

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:   # not a str, or one holding lone surrogates (undecodable bytes from argv)
            raise RecursaError("the text to encode must be a string of valid Unicode (UTF-8) characters") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust side spreads them over all cores."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dict(self._config)
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=self.eos_token, bos_token=self.bos_token)
        config.setdefault("model_max_length", _NO_MAX_LENGTH)
        config.setdefault("clean_up_tokenization_spaces", False)
        write_text_atomic(directory / "tokenizer.json", self._tok.to_str(pretty=True))
        write_text_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train a byte-level BPE: id 0 is `<|endoftext|>`, ids 1..256 the bytes, the rest merges.

    Byte-level pre-tokenization and decoding make `decode(encode(x)) == x` for any string. The
    vocabulary can come out smaller than `vocab_size` when the texts hold too few distinct merges.
    """
    if not isinstance(vocab_size, int) or vocab_size < N_BYTES + 1:
        raise RecursaError(f"vocab size must be an integer >= {N_BYTES + 1} (256 bytes + end-of-text), got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, EOS_TOKEN, None, {"model_max_length": _NO_MAX_LENGTH})


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load `directory/tokenizer.json`; special tokens come from `tokenizer_config.json` when present.

    eos is the config's `eos_token`, else `<|endoftext|>`; bos is the config's `bos_token`, else None.
    """
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise RecursaError(f"no tokenizer.json in {directory}")
    try:
        tok = _HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception subclasses on malformed files
        raise RecursaError(f"cannot read {path}: {e}") from None
    config_path = directory / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise RecursaError(f"cannot parse {config_path}: {e}") from None
    eos = _token_content(config.get("eos_token"))
    if eos is None:
        if tok.token_to_id(EOS_TOKEN) is None:
            raise RecursaError(f"{directory}: no eos_token in tokenizer_config.json and no {EOS_TOKEN} token")
        eos = EOS_TOKEN
    return Tokenizer(tok, eos, _token_content(config.get("bos_token")), config)


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...}, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


