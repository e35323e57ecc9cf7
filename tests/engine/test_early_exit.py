"""Early exit: exit specs and heads, and the engine's three KV strategies at their extremes (never
exiting is full depth; always exiting emits the shallow exit's argmax). Exactness under load:
test_engine_early_exit.py (parallel), test_engine_copy.py, test_engine_speculative.py."""
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.engine.exit_policy import ExitPolicy
from reference import full_forward_generate
from recursa.engine.thresholds import CALMDecay, Fixed, make_threshold
from recursa.errors import RecursaError
from recursa.model.exit_classifier import ExitClassifier
from recursa.model.exits import ExitHeads, ExitSpec, ExitSpecError, exit_logits
from tiny_models import agreeing_exit_model

PROMPT = [5, 17, 201, 42, 7, 99]


@pytest.fixture(scope="module")
def model():
    return agreeing_exit_model()


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


def generate(model, n, policy, strategy, **kw):
    llm = recursa.LLM(model, exit_policy=policy, exit_strategy=strategy, kv_cache_memory=2**20, **kw)
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0], llm


@pytest.mark.parametrize("strategy", ["copy", "parallel", "speculative"])
def test_never_exit_equals_full_depth_greedy(model, strategy):
    out, llm = generate(model, 20, ExitPolicy(ExitSpec((1, 2)), "max_prob", Fixed(1.1)), strategy)
    assert out.token_ids == full_forward_generate(model, PROMPT, 20)
    assert out.exit_depths == [model.depth] * 20 and llm.stats()["mean_exit_depth"] == model.depth


@pytest.mark.parametrize("strategy", ["copy", "parallel"])
def test_always_exit_emits_shallow_argmax(model, strategy):
    """Always exiting at 1 is that exit's greedy decoding from scratch: the first layer's K/V is exact
    under either strategy (copied K/V only feed layers no token reaches here)."""
    out, _ = generate(model, 16, ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.0)), strategy)
    assert out.exit_depths == [model.depth] + [1] * 15
    assert out.token_ids == _shallow_greedy(model, PROMPT, 16, 1)


def test_free_threshold_is_per_exit(model):
    """Speculative drafts label the exits they passed: those that left at 1 never label the depth-2 exit."""
    thr = make_threshold("free", 0.5, zeta=0.9, min_samples=3)
    out, _ = generate(model, 60, ExitPolicy(ExitSpec((1, 2)), "max_prob", thr), "speculative")
    assert len(out.token_ids) == 60 and set(thr.by_depth) == {1, 2}
    n1 = thr.at(1).agree.n + thr.at(1).disagree.n
    n2 = thr.at(2).agree.n + thr.at(2).disagree.n
    assert 0 < n2 < n1


def test_unknown_measure_is_an_error():
    with pytest.raises(RecursaError):
        ExitPolicy(ExitSpec((1,)), "nope", Fixed(0.5))


@pytest.mark.parametrize("measure", ["margin", "saturation", "classifier"])
def test_every_measure_drives_the_engine(model, measure):
    m = ExitClassifier(model.cfg.dim, (1, 2)) if measure == "classifier" else measure
    never, _ = generate(model, 12, ExitPolicy(ExitSpec((1, 2)), m, Fixed(1.1)), "copy")
    assert never.token_ids == full_forward_generate(model, PROMPT, 12)
    always, _ = generate(model, 12, ExitPolicy(ExitSpec((2,)), m, CALMDecay(-1.0, 1.0, 12)), "parallel")
    assert always.exit_depths == [model.depth] + [2] * 11
