"""Text data: corpus sources, tokenizers, and packed token streams for training.

`recursa data prepare` (see `recursa.data.prepare`) turns the default public-domain corpus into
`train.bin`/`val.bin` plus the tokenizer; training reads them with `read_tokens`.
"""
from recursa.data.packed import read_tokens, write_tokens
from recursa.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "read_tokens", "train_tokenizer", "write_tokens"]
