"""Tokenizer: training, exact round trips, save/load and the special-token rules of load_tokenizer."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from recursa.data.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer
from recursa.errors import RecursaError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Call me Ishmael. Some years ago\u2014never mind how long precisely\u2014having little money.",
    "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer",
    "Fellow-Citizens of the Senate and House of Representatives: the state of the union is strong.",
] * 5
UNSEEN = [
    "",
    "the the the",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f40b emoji and \x00 control",
    "literal <|endoftext|> inside text",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def test_trained_tokenizer_layout(tok):
    assert tok.eos_id == 0 and tok.bos_id is None
    assert 257 < tok.vocab_size <= 300
    assert tok.encode(EOS_TOKEN) == [0]


@pytest.mark.parametrize("text", UNSEEN + CORPUS[:4])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bpe_compresses_and_is_byte_level(tok):
    text = CORPUS[0]
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2  # merges learned from the repeated text
    # Byte-level: every byte of unseen text is representable, one id per byte at worst.
    odd = "\U0001f40b\u65e5"
    assert 1 <= len(tok.encode(odd)) <= len(odd.encode())
    # ASCII pieces decode individually and concatenate back to the text.
    assert "".join(tok.decode([i]) for i in ids) == text


def test_encode_batch_matches_encode(tok):
    texts = UNSEEN + CORPUS[:4]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_train_rejects_tiny_vocab():
    with pytest.raises(RecursaError, match="vocab size"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == EOS_TOKEN and config["bos_token"] is None
    assert isinstance(config["model_max_length"], int)
    loaded = load_tokenizer(tmp_path / "tok")
    assert (loaded.vocab_size, loaded.eos_id, loaded.bos_id) == (tok.vocab_size, tok.eos_id, tok.bos_id)
    for text in UNSEEN + CORPUS[:4]:
        assert loaded.encode(text) == tok.encode(text)


def test_saved_dir_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id is None
    for text in CORPUS[:4]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text


def _hf_dir(tmp_path, config=None, special=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    """A tokenizer dir as HF save_pretrained leaves it: tokenizer.json (+ tokenizer_config.json)."""
    vocab = {t: i for i, t in enumerate([*special, "a", "b", "ab"])}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(list(special))
    tmp_path.mkdir(parents=True, exist_ok=True)
    hf.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_load_eos_defaults_to_endoftext(tmp_path):
    t = load_tokenizer(_hf_dir(tmp_path))
    assert (t.eos_id, t.bos_id) == (0, None)
    assert t.encode("ab a") == [5, 3]


def test_load_takes_special_tokens_from_config(tmp_path):
    t = load_tokenizer(_hf_dir(tmp_path, {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": "<|im_start|>"}))
    assert (t.eos_id, t.bos_id) == (2, 1)
    assert t.encode("ab") == [5]  # encode adds no special tokens


def test_load_null_tokens_in_config(tmp_path):
    t = load_tokenizer(_hf_dir(tmp_path, {"eos_token": None, "bos_token": None, "chat_template": "x"}))
    assert (t.eos_id, t.bos_id) == (0, None)
    t.save(tmp_path / "copy")  # keys it does not own survive a save
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())["chat_template"] == "x"


def test_load_errors(tmp_path):
    with pytest.raises(RecursaError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(RecursaError, match="no token '<bos>'"):
        load_tokenizer(_hf_dir(tmp_path / "a", {"bos_token": "<bos>"}))
    with pytest.raises(RecursaError, match="no eos_token"):
        load_tokenizer(_hf_dir(tmp_path / "b", special=("<s>",)))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer.json").write_text("{not json")
    with pytest.raises(RecursaError, match="cannot read"):
        load_tokenizer(tmp_path / "c")
