"""The learned exit classifier: examples, training on a frozen model, save/load, errors, CLI use."""
import json

import numpy as np
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.cli import main
from recursa.presets import preset
from recursa.data.packed import write_tokens
from recursa.data.tokenizer import train_tokenizer
from recursa.engine.exit_policy import ExitPolicy
from recursa.model.exit_classifier import META_FILE, WEIGHTS_FILE, ExitClassifier, load_exit_classifier
from recursa.engine.thresholds import Fixed
from recursa.errors import RecursaError
from recursa.model import Decoder, load
from recursa.model.exits import ExitSpec
from recursa.train.exit_classifier import auc, evaluate, exit_examples, fit, precision_at_rate, train_exit_classifier


def _exit_model(vocab: int) -> Decoder:
    """Tiny model with exits at 1 and 2 whose upper layers change little: exits agree sometimes."""
    torch.manual_seed(0)
    m = Decoder(preset("tiny", n_layers=4, vocab_size=vocab, tie_embeddings=False, exit_depths=[1, 2])).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(25.0)
        for d in range(4):
            m.stage(d).attn.o_proj.weight.mul_(10.0 if d == 0 else 1.5)
            m.stage(d).mlp.down_proj.weight.mul_(10.0 if d == 0 else 1.5)
    return m


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit-clf")
    tok = train_tokenizer(["the cat sat on the mat. " * 40, "once upon a time there was a sea"], vocab_size=300)
    model_dir, data_dir = root / "model", root / "data"
    _exit_model(tok.vocab_size).save(model_dir)
    tok.save(model_dir)
    rng = np.random.default_rng(0)
    write_tokens(data_dir, "train", [rng.integers(0, tok.vocab_size, 400).tolist() for _ in range(8)], tok.vocab_size)
    write_tokens(data_dir, "val", [rng.integers(0, tok.vocab_size, 400).tolist() for _ in range(2)], tok.vocab_size)
    return model_dir, data_dir


def test_examples_match_a_hand_computation():
    model = _exit_model(256)
    ids = torch.randint(0, 256, (2, 10))
    ex = exit_examples(model, ids, (1, 2))
    with torch.no_grad():   # the same (inference) kernels as exit_examples
        hidden = model.forward_hidden(ids)
        final = model.head(hidden[4]).argmax(-1)
    for d, prev in ((1, 0), (2, 1)):  # saturation: the first exit against one layer below, then the previous exit
        h, f, y = ex[d]
        with torch.no_grad():
            z = model.head(hidden[d])
        probs = torch.softmax(z, -1).flatten(0, 1)
        top = probs.topk(2, -1).values
        cos = torch.nn.functional.cosine_similarity(hidden[d], hidden[prev], dim=-1).flatten()
        torch.testing.assert_close(f, torch.stack((top[:, 0], top[:, 0] - top[:, 1], cos), -1), atol=1e-6, rtol=0)
        assert torch.equal(y, (z.argmax(-1) == final).float().flatten())
        assert torch.equal(h, hidden[d].flatten(0, 1))
    with pytest.raises(RecursaError):
        exit_examples(model, ids, (4,))


def test_auc_and_precision_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1, 0.5])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in pos for b in neg]
    assert auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
    assert precision_at_rate(scores, labels, 2) == pytest.approx(0.5)  # 0.9 (agree) and one 0.8
    assert precision_at_rate(scores, labels, 0) is None and auc(scores, torch.ones(6)) is None


def test_fit_learns_a_rule_on_the_features():
    torch.manual_seed(0)
    n, dim = 2000, 8
    hidden, feats = torch.randn(n, dim), torch.rand(n, 3)
    labels = (feats[:, 1] > 0.5).float()  # agreement decided by the margin feature
    clf = ExitClassifier(dim, (3,), hidden_dim=16)
    losses = fit(clf, {3: (hidden, feats, labels)}, steps=300, lr=1e-2)
    assert np.mean(losses[-20:]) < 0.5 * losses[0]
    report = evaluate(clf, {3: (hidden, feats, labels)})[3]
    assert report["accuracy"] > 0.9 and report["auc"] > 0.95
    with pytest.raises(RecursaError):
        fit(clf, {3: (hidden[:0], feats[:0], labels[:0])}, steps=1)


def test_train_on_a_frozen_model_saves_and_loads(dirs):
    model_dir, data_dir = dirs
    before = (model_dir / "model.safetensors").read_bytes()
    clf, report = train_exit_classifier(model_dir, data_dir, steps=150, tokens=1024, val_tokens=512, seq_len=32,
                                        batch_size=8, lr=1e-2, hidden_dim=32, log=lambda s: None)
    assert report["loss_last"] < report["loss_first"]  # the loss falls
    assert set(report["exits"]) == {"1", "2"}
    for r in report["exits"].values():
        assert 0 < r["agree_rate"] < 1 and 0 <= r["accuracy"] <= 1
    assert (model_dir / "model.safetensors").read_bytes() == before  # the model stays frozen
    meta = json.loads((model_dir / META_FILE).read_text())
    assert meta["depths"] == [1, 2] and meta["report"]["steps"] == 150
    model = load(model_dir)
    loaded = load_exit_classifier(model_dir, model)
    h, f = torch.randn(5, model.cfg.dim), torch.rand(5, 3)
    for d in (1, 2):
        torch.testing.assert_close(loaded(h, f, d), clf(h, f, d), atol=0, rtol=0)
    # drives the decoder as a confidence measure
    llm = recursa.LLM(model, exit_policy=ExitPolicy(ExitSpec((1, 2)), loaded, Fixed(0.0)), kv_cache_memory=2**20)
    out = llm.generate([[5, 17, 20]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert out.exit_depths == [4] + [1] * 9


def test_bad_directories_are_recursa_errors(dirs, tmp_path):
    model_dir, data_dir = dirs
    with pytest.raises(RecursaError, match="does not exist"):
        load_exit_classifier(tmp_path / "nope")
    with pytest.raises(RecursaError, match="train-exit-classifier"):
        load_exit_classifier(tmp_path)
    ExitClassifier(16, (1,)).save(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(RecursaError, match="not a valid"):
        load_exit_classifier(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"dim": 32, "depths": [1], "hidden_dim": 64}))
    with pytest.raises(RecursaError, match="does not hold"):
        load_exit_classifier(tmp_path)
    ExitClassifier(16, (1,)).save(tmp_path)
    with pytest.raises(RecursaError, match="hidden size"):
        load_exit_classifier(tmp_path, load(model_dir))
    ExitClassifier(load(model_dir).cfg.dim, (1,)).save(tmp_path)
    with pytest.raises(RecursaError, match="retrain"):
        load_exit_classifier(tmp_path, load(model_dir))
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(RecursaError, match="exist"):
        train_exit_classifier(model_dir, tmp_path / "nodata", steps=1)
    with pytest.raises(RecursaError, match="no exits"):
        Decoder(preset("tiny", vocab_size=300)).save(tmp_path / "plain")
        train_exit_classifier(tmp_path / "plain", data_dir, steps=1)
    with pytest.raises(RecursaError, match="steps"):
        train_exit_classifier(model_dir, data_dir, steps=0)
    with pytest.raises(RecursaError):
        ExitClassifier(16, (1, 2)).score(torch.zeros(4), torch.zeros(16), torch.zeros(16))  # which exit?


def test_cli_trains_then_generate_uses_it(dirs, tmp_path, capsys):
    model_dir, data_dir = dirs
    assert main(["train-exit-classifier", str(model_dir), "--data", str(data_dir), "--steps", "20",
                 "--tokens", "512", "--val-tokens", "256", "--seq-len", "32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "exit 1:" in out and "exit 2:" in out and "max_prob" in out
    assert main(["generate", str(model_dir), "--prompt", "the cat", "--max-tokens", "5", "--exit-strategy",
                 "parallel", "--exit-measure", "classifier", "--exit-threshold", "0"]) == 0
    assert "mean depth" in capsys.readouterr().out
    # a model directory without a trained classifier: one-line error
    plain = tmp_path / "fresh"
    load(model_dir).save(plain)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            (plain / name).write_bytes((model_dir / name).read_bytes())
    assert main(["generate", str(plain), "--prompt", "x", "--exit-strategy", "copy", "--exit-measure", "classifier"]) == 2
    err = capsys.readouterr().err
    assert "train-exit-classifier" in err and len(err.strip().splitlines()) == 1
    assert main(["train-exit-classifier", str(tmp_path / "missing"), "--data", str(data_dir)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
