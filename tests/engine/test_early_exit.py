"""Early-exit decoding: exactness of the three KV strategies against full forwards."""
import pytest
import torch

from recursa.presets import preset
from recursa.engine.early_exit import EarlyExitDecoder, early_exit_generate
from recursa.engine.exit_policy import ExitPolicy
from reference import full_forward_generate
from recursa.engine.thresholds import Fixed, make_threshold
from recursa.errors import RecursaError
from recursa.model import Decoder
from recursa.model.exits import ExitHeads, ExitSpec, ExitSpecError, exit_logits

PROMPT = [5, 17, 201, 42, 7, 99]


def _model(n_layers=4, deep_scale=0.15, lm_scale=25.0, seed=0):
    """A tiny model whose upper layers change the residual stream little, so shallow exits
    agree with the full model on some tokens and not on others (a random model never agrees)."""
    torch.manual_seed(seed)
    m = Decoder(preset("tiny", n_layers=n_layers, vocab_size=256, tie_embeddings=False)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(lm_scale)  # peaked logits: confidences spread over (0, 1)
        for d in range(n_layers):
            scale = 10.0 if d == 0 else 10.0 * deep_scale
            m.stage(d).attn.o_proj.weight.mul_(scale)
            m.stage(d).mlp.down_proj.weight.mul_(scale)
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


def _full_kv(model, ids):
    """Every depth's K/V for the sequence from one uncached full-sequence forward."""
    h = model.embed(torch.tensor([ids]))
    cos, sin = model.rope(torch.arange(len(ids)))
    out = []
    for d in range(model.depth):
        h, kv = model.forward_stage(d, h, cos, sin)
        out.append(kv)
    return out


def _shallow_greedy(model, prompt, n, depth):
    """First token from the full model, then argmax of the exit at `depth`, recomputed from scratch."""
    ids = list(prompt)
    with torch.no_grad():
        out = [int(model(torch.tensor([ids]))[0, -1].argmax())]
        while len(out) < n:
            hidden = model.forward_hidden(torch.tensor([ids + out]))
            out.append(int(exit_logits(model, hidden[depth][0, -1], depth).argmax()))
    return out


def test_exit_spec_roundtrip_and_errors(model):
    spec = ExitSpec(depths=(1, 2), own_norm=True)
    assert ExitSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ExitSpecError):
        ExitSpec(depths=(2, 1))
    with pytest.raises(ExitSpecError):
        ExitSpec(depths=(0,))
    with pytest.raises(ExitSpecError):
        ExitSpec(depths=(4,)).check(model.depth)
    with pytest.raises(ExitSpecError):
        ExitSpec.from_dict({"depths": [1], "bogus": 1})


def test_exit_logits_shared_and_own_norm(model):
    h = torch.randn(3, model.cfg.dim)
    assert torch.equal(exit_logits(model, h, 2), model.head(h))
    heads = ExitHeads(model, ExitSpec((2,), own_norm=True))
    assert torch.allclose(exit_logits(model, h, 2, heads), model.head(h))  # initialised to the final norm
    with torch.no_grad():
        heads.norms["2"].weight.mul_(2.0)
    ref = torch.nn.functional.linear(model.norm(h) * 2.0, model.lm_head.weight)
    assert torch.allclose(exit_logits(model, h, 2, heads), ref, atol=1e-5)


@pytest.mark.parametrize("strategy", ["copy", "parallel", "speculative"])
def test_never_exit_equals_full_depth_greedy(model, strategy):
    ref = full_forward_generate(model, PROMPT, 20)
    res = early_exit_generate(model, PROMPT, 20, ExitPolicy(ExitSpec((1, 2)), "max_prob", Fixed(1.1)), strategy)
    assert res.tokens == ref
    assert res.exit_depths == [model.depth] * 20 and res.mean_depth == model.depth


def test_always_exit_parallel_emits_shallow_argmax(model):
    res = early_exit_generate(model, PROMPT, 16, ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.0)), "parallel")
    assert res.tokens == _shallow_greedy(model, PROMPT, 16, 1)
    assert res.exit_depths == [model.depth] + [1] * 15
    assert res.exit_shares == {1: 15 / 16, model.depth: 1 / 16}


@pytest.mark.parametrize("depths,thr", [((1,), 0.5), ((1, 2), 0.5), ((2,), 0.3), ((1, 3), 0.7)])
def test_parallel_decoding_kv_is_exact(model, depths, thr):
    dec = EarlyExitDecoder(model, PROMPT, 40, ExitPolicy(ExitSpec(depths), "max_prob", Fixed(thr)), "parallel")
    res = dec.run()
    exited = sum(d < model.depth for d in res.exit_depths)
    assert 0 < exited < 39, res.exit_depths  # the test must see both stacked and deep tokens
    dec.complete_kv()
    ids = PROMPT + dec.tokens[:-1]
    assert dec.filled == [len(ids)] * model.depth
    for d, (k, v) in enumerate(_full_kv(model, ids)):
        torch.testing.assert_close(dec.cache[d][0][:, :, :len(ids)], k, atol=1e-5, rtol=0)
        torch.testing.assert_close(dec.cache[d][1][:, :, :len(ids)], v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("depths,thr,max_draft", [((1,), 0.0, 4), ((1,), 0.5, 3), ((2,), 0.2, 6), ((1, 2), 0.4, 2)])
def test_self_speculative_equals_full_greedy(model, depths, thr, max_draft):
    ref = full_forward_generate(model, PROMPT, 40)
    res = early_exit_generate(model, PROMPT, 40, ExitPolicy(ExitSpec(depths), "max_prob", Fixed(thr)),
                              "speculative", max_draft=max_draft)
    assert res.tokens == ref
    assert res.drafted > res.accepted > 0  # both acceptance and rejection were exercised


def test_state_copying_fills_every_layer_and_differs_from_exact(model):
    dec = EarlyExitDecoder(model, PROMPT, 30, ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.5)), "copy")
    res = dec.run()
    ids = PROMPT + dec.tokens[:-1]
    assert dec.filled == [len(ids)] * model.depth and not dec.pending
    full = _full_kv(model, ids)
    # layer 0 is always computed; the copied layers of exited tokens are an approximation
    torch.testing.assert_close(dec.cache[0][0][:, :, :len(ids)], full[0][0], atol=1e-5, rtol=0)
    assert 1 in res.exit_depths
    assert not torch.allclose(dec.cache[3][0][:, :, :len(ids)], full[3][0], atol=1e-3)


def test_copy_exit_kv_equals_projection_of_copied_state(model):
    """The K/V written for a skipped layer is that layer's k-projection of the exit hidden state."""
    dec = EarlyExitDecoder(model, PROMPT, 2, ExitPolicy(ExitSpec((2,)), "max_prob", Fixed(0.0)), "copy")
    dec.run()
    p = len(PROMPT)  # the first fed generated token exited at depth 2
    hidden = model.forward_hidden(torch.tensor([PROMPT + dec.tokens[:1]]))[2][:, -1:]
    cos, sin = model.rope(torch.tensor([p]))
    _, k, v = model.stage(3).attn.qkv(model.stage(3).attn_norm(hidden), cos, sin)
    torch.testing.assert_close(dec.cache[3][0][:, :, p:p + 1], k, atol=1e-5, rtol=0)


class Recorder:
    """A fixed threshold that records every (depth, confidence, agreed) pair the decoder observes."""

    def __init__(self, value):
        self.value, self.pairs = value, []

    def __call__(self, step, depth):
        return self.value

    def observe(self, confidence, agreed, depth):
        self.pairs.append((depth, confidence, agreed))


def test_every_exit_is_labelled_by_deep_passes(model):
    """Parallel: every fed token, exited or not, labels each exit it passed once its deep pass ran;
    the labels equal exit argmax == final argmax of a full forward over the same sequence."""
    thr = Recorder(0.5)
    dec = EarlyExitDecoder(model, PROMPT, 40, ExitPolicy(ExitSpec((1, 2)), "max_prob", thr), "parallel")
    res = dec.run()
    assert 0 < sum(d < model.depth for d in res.exit_depths) < 39
    dec.complete_kv()
    ids = PROMPT + dec.tokens[:-1]
    with torch.no_grad():
        hidden = model.forward_hidden(torch.tensor([ids]))
        final = model.head(hidden[-1][0]).argmax(-1)
        want = []
        for i in range(len(dec.tokens) - 1):  # token i is fed at position P + i; its output has depth depths[i+1]
            p = len(PROMPT) + i
            for e in (1, 2):
                if e <= dec.depths[i + 1]:
                    z = exit_logits(model, hidden[e][0, p], e)
                    want.append((e, float(torch.softmax(z, -1).max()), int(z.argmax()) == int(final[p])))
    got, want = sorted(thr.pairs), sorted(want)
    assert [(d, a) for d, _, a in got] == [(d, a) for d, _, a in want]
    assert [c for _, c, _ in got] == pytest.approx([c for _, c, _ in want], abs=1e-4)
    assert sum(1 for d, _, _ in thr.pairs if d == 1) == len(dec.tokens) - 1  # exited tokens included


def test_free_threshold_is_per_exit_in_the_decoder(model):
    thr = make_threshold("free", 0.5, zeta=0.9, min_samples=3)
    res = early_exit_generate(model, PROMPT, 60, ExitPolicy(ExitSpec((1, 2)), "max_prob", thr), "parallel")
    assert len(res.tokens) == 60 and set(thr.by_depth) == {1, 2}
    n1 = thr.at(1).agree.n + thr.at(1).disagree.n
    n2 = thr.at(2).agree.n + thr.at(2).disagree.n
    assert 0 < n2 < n1  # tokens that exit at depth 1 never label the depth-2 exit


def test_layer_accounting_per_strategy(model):
    """copy runs one layer per exited token plus K/V-only projections above; parallel catches up exactly."""
    n, L = 8, model.depth
    copy = early_exit_generate(model, PROMPT, n, ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.0)), "copy")
    assert copy.exit_depths == [L] + [1] * (n - 1)
    assert copy.layer_tokens == n - 1 and copy.kv_layer_tokens == (n - 1) * (L - 1)
    dec = EarlyExitDecoder(model, PROMPT, n, ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.0)), "parallel")
    res = dec.run()
    assert res.layer_tokens == n - 1 and res.kv_layer_tokens == 0
    dec.complete_kv()
    assert dec.stats["layer_tokens"] == (n - 1) * L
    full = early_exit_generate(model, PROMPT, n, ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(1.1)), "copy")
    assert full.layer_tokens == (n - 1) * L and full.kv_layer_tokens == 0


def test_stop_ids_and_errors(model):
    ref = full_forward_generate(model, PROMPT, 20)
    stop = ref[5]
    first = ref.index(stop)
    res = early_exit_generate(model, PROMPT, 20, ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.0)),
                              "speculative", stop_ids=[stop])
    assert res.tokens == ref[:first + 1]
    policy = ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.5))
    with pytest.raises(RecursaError):
        early_exit_generate(model, PROMPT, 4, policy, "bogus")
    with pytest.raises(RecursaError):
        early_exit_generate(model, PROMPT, 4, policy, "speculative", temperature=1.0)
    with pytest.raises(RecursaError):
        early_exit_generate(model, [], 4, policy)
    with pytest.raises(RecursaError):
        early_exit_generate(model, PROMPT, 10_000, policy)
    with pytest.raises(RecursaError):
        ExitPolicy(ExitSpec((1,)), "nope", Fixed(0.5))


def test_parallel_and_speculative_on_a_recursive_model():
    """Weight-shared depths go through the same stage API: exactness holds there too."""
    torch.manual_seed(0)
    m = Decoder(preset("tiny", n_layers=4, vocab_size=256, tie_embeddings=False, sharing="cycle", n_loops=2)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(25.0)
        for i, block in enumerate(m.layers):
            block.attn.o_proj.weight.mul_(10.0 if i == 0 else 1.5)
            block.mlp.down_proj.weight.mul_(10.0 if i == 0 else 1.5)
    policy = ExitPolicy(ExitSpec((2,)), "max_prob", Fixed(0.3))
    dec = EarlyExitDecoder(m, PROMPT, 30, policy, "parallel")
    res = dec.run()
    assert 0 < sum(d < m.depth for d in res.exit_depths) < 29, res.exit_depths
    dec.complete_kv()
    ids = PROMPT + dec.tokens[:-1]
    for d, (k, v) in enumerate(_full_kv(m, ids)):
        torch.testing.assert_close(dec.cache[d][0][:, :, :len(ids)], k, atol=1e-5, rtol=0)
        torch.testing.assert_close(dec.cache[d][1][:, :, :len(ids)], v, atol=1e-5, rtol=0)
    spec_res = early_exit_generate(m, PROMPT, 30, ExitPolicy(ExitSpec((2,)), "max_prob", Fixed(0.3)), "speculative")
    assert spec_res.tokens == full_forward_generate(m, PROMPT, 30)


@pytest.mark.parametrize("measure", ["margin", "saturation", "classifier"])
def test_every_measure_drives_the_decoder(model, measure):
    from recursa.model.exit_classifier import ExitClassifier
    from recursa.engine.thresholds import CALMDecay

    m = ExitClassifier(model.cfg.dim, (1, 2)) if measure == "classifier" else measure
    never = early_exit_generate(model, PROMPT, 12, ExitPolicy(ExitSpec((1, 2)), m, Fixed(1.1)), "copy")
    assert never.tokens == full_forward_generate(model, PROMPT, 12)
    always = early_exit_generate(model, PROMPT, 12, ExitPolicy(ExitSpec((2,)), m, CALMDecay(-1.0, 1.0, 12)),
                                 "parallel")
    assert always.exit_depths == [model.depth] + [2] * 11
