"""One bad request never takes the engine down (issue 15, defect 1).

Parameters are checked when a request is added; a failure inside a step (NaN logits, a sampler
or model that raises) finishes the requests it hit with finish_reason "error", frees their KV,
and every other request finishes exactly as it would alone. Public API only (LLM, LLMEngine,
SamplingParams), so these hold whatever the engine's internals look like.
"""
from __future__ import annotations

import pytest
import torch

from recursa import LLM, SamplingParams
from recursa.config import ModelConfig
from recursa.errors import RecursaError
from recursa.model import Decoder

VOCAB = 64
POISON = 7      # token id whose embedding row is NaN in `nan_model`


def _model(**changes) -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=64,
                      **changes)
    return Decoder(cfg).eval()


def _run(llm, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        llm.add_request(rid, prompt, params)
    done = {}
    for _ in range(10_000):
        if not llm.has_unfinished():
            break
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
    return done


GOOD = [1, 2, 3, 4]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _alone(model, prompt=GOOD, params=GREEDY):
    return LLM(model).generate(prompt, params)[0].token_ids


@pytest.mark.parametrize("kwargs, needle", [
    (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=2.5), "max_tokens"), (dict(max_tokens=0), "max_tokens"), (dict(max_tokens="8"), "max_tokens"),
    (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed"), (dict(seed="1"), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="0.5"), "temperature"), (dict(top_p=float("nan")), "top_p"), (dict(top_p=0), "top_p"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"), (dict(stop_token_ids="1"), "stop_token_ids"),
    (dict(stop=[""]), "stop"), (dict(ignore_eos="no"), "ignore_eos"), (dict(n=2), "n=2"), (dict(n=1.0), "n="),
])
def test_bad_sampling_params_are_refused_up_front(kwargs, needle):
    with pytest.raises(RecursaError, match=needle):
        SamplingParams(**kwargs)


def test_good_edge_values_are_accepted():
    SamplingParams(top_k=-1, seed=2**64 - 1, max_tokens=1, n=1, stop_token_ids=[0])
    SamplingParams(seed=-2**63, temperature=0, top_p=1)


def test_stop_token_ids_outside_the_vocabulary_are_refused_when_added():
    llm = LLM(_model())
    with pytest.raises(RecursaError, match="stop_token_ids"):
        llm.add_request("a", GOOD, SamplingParams(stop_token_ids=[VOCAB]))
    assert not llm.has_unfinished() and llm.kv.num_free_blocks == llm.kv.num_blocks


def test_a_failing_sampler_finishes_only_its_request():
    """The issue's case: top_k=2.5 reaching the sampler (set after validation) fails that request alone."""
    model = _model()
    llm = LLM(model)
    bad = SamplingParams(temperature=1.0, max_tokens=8, seed=1)
    bad.top_k = 2.5                               # bypasses the check, as an older client might
    done = _run(llm, {"good": (GOOD, GREEDY), "bad": ([5, 6, 7], bad), "also": ([9, 8], GREEDY)})
    assert done["bad"].finish_reason == "error"
    assert done["good"].token_ids == _alone(model) and done["good"].finish_reason == "length"
    assert done["also"].token_ids == _alone(model, [9, 8])
    assert llm.kv.num_free_blocks == llm.kv.num_blocks and not llm.has_unfinished()
    assert llm.generate(GOOD, GREEDY)[0].token_ids == _alone(model)   # the engine still works


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_finish_that_request_with_an_error(temperature):
    """A NaN in one (untied) embedding row: requests whose prompt holds that token get NaN logits."""
    model = _model(tie_embeddings=False)
    reference = _alone(model)
    with torch.no_grad():
        model.embed_tokens.weight[POISON] = float("nan")
    llm = LLM(model)
    params = SamplingParams(temperature=temperature, max_tokens=8, seed=3, ignore_eos=True)
    done = _run(llm, {"poisoned": ([1, POISON, 2], params), "good": (GOOD, GREEDY)})
    assert done["poisoned"].finish_reason == "error" and done["poisoned"].token_ids == []
    assert done["good"].token_ids == reference
    assert llm.kv.num_free_blocks == llm.kv.num_blocks


def test_an_exception_inside_a_step_fails_its_group_and_the_engine_goes_on():
    model = _model()
    reference = _alone(model)
    llm = LLM(model)
    calls = {"n": 0}

    def fail_once(module, args, output):   # the final norm raises the first time it runs
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")

    handle = model.norm.register_forward_hook(fail_once)
    try:
        done = _run(llm, {"a": (GOOD, GREEDY), "b": ([9, 8, 7], GREEDY)})
    finally:
        handle.remove()
    assert calls["n"] >= 1
    reasons = {rid: out.finish_reason for rid, out in done.items()}
    assert set(reasons) == {"a", "b"} and "error" in reasons.values()
    if reasons["a"] != "error":
        assert done["a"].token_ids == reference
    assert llm.kv.num_free_blocks == llm.kv.num_blocks and not llm.has_unfinished()
    assert llm.step() == []
    assert llm.generate(GOOD, GREEDY)[0].token_ids == reference     # later requests are served normally
