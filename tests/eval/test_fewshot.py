import pytest
import torch

from recursa import Decoder, ModelConfig, RecursaError, preset
from recursa.data.tokenizer import train_tokenizer
from recursa.eval import Doc, Task, encode_pair, evaluate_task, score_requests

TEXT = ["the cat sat on the mat. the dog ran in the park, and a cow stood at the gate."] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(TEXT, vocab_size=300)


def bigram_model(table: torch.Tensor) -> Decoder:
    """A Decoder that is exactly the bigram model log_softmax(table[current]) for the next token.

    Identity embeddings, zeroed attention/MLP outputs (the residual stream stays the embedding),
    and an LM head that maps the normalised one-hot back to the table row.
    """
    V = table.shape[0]
    cfg = ModelConfig(vocab_size=V, dim=V, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=16,
                      max_seq_len=64, tie_embeddings=False)
    model = Decoder(cfg).double().eval()
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.eye(V, dtype=torch.float64))
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        scale = (1.0 / V + cfg.norm_eps) ** -0.5  # RMSNorm of a one-hot vector
        model.lm_head.weight.copy_(table.T.double() / scale)
    return model


def planted_table(tok, phrase: str, boost: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(96, 96, generator=g, dtype=torch.float64)
    ids = tok.encode(phrase)
    for a, b in zip(ids, ids[1:]):
        table[a, b] += boost
    return table


def reference_scores(model, tok, requests):
    """One request at a time through the full-sequence forward, harness-style truncation."""
    out = []
    L = model.cfg.max_seq_len
    for context, continuation in requests:
        ctx, cont = encode_pair(tok, context, continuation)
        ctx = ctx or [tok.eos_id]  # an empty context conditions on end-of-text, as in lm-eval
        ids = (ctx + cont)[-(L + 1):]
        with torch.no_grad():
            logits = model(torch.tensor(ids[:-1])[None])[0]
        logp = torch.log_softmax(logits.double(), -1)[-len(cont):]
        out.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
    return out


def test_encode_pair_boundaries(bpe):
    ctx, cont = encode_pair(bpe, "the cat", " sat on")
    assert ctx == bpe.encode("the cat") and ctx + cont == bpe.encode("the cat sat on")
    # trailing whitespace of the context belongs to the continuation
    assert encode_pair(bpe, "the cat ", "sat on") == (ctx, cont)
    assert bpe.decode(cont) == " sat on"


def test_bigram_scores_and_planted_answer(char_tok):
    table = planted_table(char_tok, "the cat")
    model = bigram_model(table)
    logp = torch.log_softmax(table, -1)
    requests = [("the", " dog"), ("the", " cat"), ("the", " cow"), ("the cat", " sat"), ("a", " cat sat")]
    scores = score_requests(model, char_tok, requests, batch_size=2)
    for (ctx, cont), s in zip(requests, scores):
        ids = char_tok.encode(ctx + cont)
        expected = sum(logp[a, b].item() for a, b in zip(ids[len(ctx) - 1:], ids[len(ctx):]))
        assert s.logprob == pytest.approx(expected, abs=1e-5)  # RMSNorm runs in fp32
        assert s.n_tokens == len(cont)
    assert max(range(3), key=lambda i: scores[i].logprob) == 1
    assert scores[1].greedy and not scores[0].greedy and not scores[2].greedy


def test_batched_equals_one_by_one(bpe):
    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=bpe.vocab_size, max_seq_len=64)).double().eval()
    requests = [
        ("the cat sat on", " the mat."), ("the cat sat on", " the dog"), ("the cat sat on", " a cow stood at the gate."),
        ("a cow", " stood"), ("the dog ran in the park, and", " a cow stood"), ("the dog ran in the park, and", " the cat"),
        ("", "the cat"), ("the ", "park"),
    ]
    ref = reference_scores(model, bpe, requests)
    for batch_size in (1, 3, 16):
        got = [s.logprob for s in score_requests(model, bpe, requests, batch_size=batch_size)]
        assert got == pytest.approx(ref, abs=1e-9)
    model32 = model.float()
    got32 = [s.logprob for s in score_requests(model32, bpe, requests, batch_size=4)]
    assert got32 == pytest.approx(reference_scores(model32, bpe, requests), abs=1e-4)


def test_mor_model_scores_with_its_causal_routing(bpe):
    """MoR models route by the sequence they are in: each request is scored by a causal forward."""
    torch.manual_seed(0)
    model = Decoder(preset("mor-tiny", vocab_size=bpe.vocab_size, max_seq_len=64)).double().eval()
    requests = [("the cat sat on", " the mat."), ("the cat sat on", " the dog"), ("", "the cat")]
    got = [s.logprob for s in score_requests(model, bpe, requests, batch_size=4)]
    assert got == pytest.approx(reference_scores(model, bpe, requests), abs=1e-9)


def test_left_truncation_to_max_seq_len(bpe):
    torch.manual_seed(1)
    model = Decoder(preset("tiny", vocab_size=bpe.vocab_size, max_seq_len=12)).double().eval()
    long_context = " ".join(TEXT[0].split()[:12])
    requests = [(long_context, " the mat."), ("the", " cat")]
    got = [s.logprob for s in score_requests(model, bpe, requests, batch_size=2)]
    assert got == pytest.approx(reference_scores(model, bpe, requests), abs=1e-9)
    with pytest.raises(RecursaError, match="does not fit"):
        score_requests(model, bpe, [("the", " cat" * 20)])


def test_evaluate_task_metrics(char_tok):
    model = bigram_model(planted_table(char_tok, "the cat"))
    docs = [Doc(0, [("the", " dog"), ("the", " cat")], 1), Doc(1, [("the", " cat"), ("the", " cow")], 1)]
    res = evaluate_task(model, char_tok, Task("toy", "rc_0shot", "acc_per_char", docs))
    assert res["n_docs"] == 2 and res["acc"] == res["acc_per_char"] == res["acc_per_token"] == 0.5
    assert res["primary_metric"] == "acc_per_char"
    greedy = Task("toy", "bpb_0shot", "logits_per_byte", [Doc(0, [("the", " cat")], None), Doc(1, [("the", " dog")], None)])
    res = evaluate_task(model, char_tok, greedy)
    assert res["kind"] == "greedy" and res["acc"] == 0.5 and res["primary_metric"] == "bits_per_byte"
    s = score_requests(model, char_tok, [("the", " cat"), ("the", " dog")])
    assert res["bits_per_byte"] == pytest.approx(-(s[0].logprob + s[1].logprob) / 8 / torch.log(torch.tensor(2.0)).item())
