"""The engine's copy and speculative strategies against the single-request decoder they replace."""
import pytest

import recursa
from recursa import SamplingParams
from recursa.engine.early_exit import early_exit_generate
from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.thresholds import Fixed
from recursa.model.exits import ExitSpec
from tiny_models import agreeing_exit_model

PROMPT = [5, 17, 201, 42, 7, 99]


@pytest.mark.parametrize("strategy", ["copy", "speculative", "parallel"])
@pytest.mark.parametrize("depths,thr", [((1,), 0.5), ((1, 2), 0.4), ((2,), 0.2), ((1,), 0.0)])
def test_engine_equals_the_single_request_decoder(strategy, depths, thr):
    m = agreeing_exit_model()
    old = early_exit_generate(m, PROMPT, 30, ExitPolicy(ExitSpec(depths), "max_prob", Fixed(thr)), strategy,
                              max_draft=3)
    llm = recursa.LLM(m, exit_policy=ExitPolicy(ExitSpec(depths), "max_prob", Fixed(thr)), exit_strategy=strategy,
                      max_draft=3, kv_cache_memory=2**20)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    assert out.token_ids == old.tokens and out.exit_depths == old.exit_depths
    assert 0 < sum(d < m.depth for d in old.exit_depths) <= 29
    if strategy == "speculative":
        st = llm.stats()
        assert (st["draft_tokens"], st["accepted_draft_tokens"]) == (old.drafted, old.accepted)
    if strategy == "copy":
        assert llm.stats()["copied_kv_layer_tokens"] == old.kv_layer_tokens
