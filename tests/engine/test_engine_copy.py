"""State copying (CALM) in the engine equals its rule replayed on one uncached forward.

Reference: tests/reference.py's copied_state_hidden — a plain full-sequence forward in which a
position stops changing after the depth its token exited at (so deeper layers compute its K/V
from the copied state) — with the exit rule replayed token by token on it: at each exit of a
decoded token, exit if the measure clears the threshold, else go on. Requests of different
lengths arrive at different steps, prefill is chunked, and memory pressure preempts requests
(their recomputed chunks hold prompt tokens and exited tokens): outputs must not change.
"""
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.thresholds import Fixed
from recursa.model import Decoder
from recursa.model.exits import ExitSpec
from recursa.presets import preset
from reference import copied_state_hidden, replay_exit_rule, run_arrivals

PROMPTS = [[5, 17, 99, 3, 250], list(range(1, 30)), [7] * 9, [300, 2, 3, 4] * 3]
SPEC = ExitSpec((2, 4))
N = 14


def measure(logits, h, prev, depth):
    """A deterministic stand-in confidence that exits at both exits and goes deep, token by token."""
    return float(h[depth] > 0.0)


def _model(**kw) -> Decoder:
    torch.manual_seed(7)
    return Decoder(preset("tiny", n_layers=6, init_std=0.2, **kw)).eval()   # 0.2: tokens vary


def replay(model, prompt, out):
    """(tokens, depths) of the exit rule on the copied-state forward of prompt + out's tokens, the
    engine's depths being the copy decisions (each position depends only on earlier ones)."""
    ids = prompt + out.token_ids[:-1]
    hidden = copied_state_hidden(model, ids, [model.depth] * (len(prompt) - 1) + out.exit_depths)
    return replay_exit_rule(model, hidden, len(prompt), len(out.token_ids), SPEC.depths, measure)[:2]


def llm_for(model, strategy="copy", **kw):
    return recursa.LLM(model, exit_policy=ExitPolicy(SPEC, measure, Fixed(0.5)), exit_strategy=strategy, **kw)


# 4-token block groups at 6 depths x 2 KV heads x 32 dims x 4 bytes x 2 (K, V): 16 of them hold 64 tokens
PREEMPT = dict(block_size=4, kv_cache_memory=16 * 4 * 6 * 2 * 32 * 4 * 2, max_num_seqs=3)
PARAMS = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)


@pytest.mark.parametrize("shape", [dict(), dict(sharing="cycle", n_loops=3)], ids=["vanilla", "recursive"])
@pytest.mark.parametrize("setting", ["depthwise", "synchronous", "preempt"])
def test_state_copying_equals_its_replay_on_a_full_forward(shape, setting):
    model = _model(**shape)
    kw = PREEMPT if setting == "preempt" else dict(kv_cache_memory=2**20)
    llm = llm_for(model, policy="synchronous" if setting == "synchronous" else "depthwise",
                  max_num_batched_tokens=12, **kw)
    outs = run_arrivals(llm, PROMPTS, PARAMS)
    exact = run_arrivals(llm_for(model, "parallel", kv_cache_memory=2**20), PROMPTS, PARAMS)
    seen = set()
    for prompt, out in zip(PROMPTS, outs):
        tokens, depths = replay(model, prompt, out)
        assert out.token_ids == tokens and out.exit_depths == depths
        seen.update(depths)
    assert seen == {2, 4, 6}
    assert [o.token_ids for o in outs] != [o.token_ids for o in exact]   # copied K/V is not exact K/V
    st = llm.stats()
    assert (st["preemptions"] > 0) == (setting == "preempt") and st["kv_free_blocks"] == st["kv_blocks"]


def test_preempted_copy_request_recomputes_the_copied_kv():
    """A request preempted mid-generation is recomputed from prompt + outputs in one chunk; the positions
    whose tokens exited leave that chunk at their exits with copied K/V, so nothing changes."""
    model = _model()
    one = llm_for(model, kv_cache_memory=2**20)
    alone = one.generate([PROMPTS[1]], PARAMS)[0]
    llm = llm_for(model, kv_cache_memory=2**20)
    llm.add_request("r", PROMPTS[1], PARAMS)
    out, preempted, chunks = None, False, []
    embed = llm.runner.embed
    llm.runner.embed = lambda seqs: (chunks.extend((s.chunk_start, s.chunk_end) for s in seqs), embed(seqs))
    while llm.has_unfinished():
        for o in llm.step():
            out = o
        seq = llm.seqs.get("r")
        if not preempted and seq is not None and len(seq.output_token_ids) == 9 and not seq.in_flight:
            llm.scheduler.preempt(seq)
            preempted = True
    assert preempted and (0, len(PROMPTS[1]) + 8) in chunks     # the recompute chunk: prompt + 8 outputs
    assert out.token_ids == alone.token_ids and out.exit_depths == alone.exit_depths
    recopied = sum(6 - d for d in alone.exit_depths[1:9])        # positions P..P+7 had exited at these depths
    assert recopied > 0
    assert llm.stats()["copied_kv_layer_tokens"] == one.stats()["copied_kv_layer_tokens"] + recopied


def test_copy_writes_kv_only_for_the_skipped_layers():
    """Always exiting at 2: after prefill every token runs 2 layers and projects K/V for the other 4."""
    model = _model()
    llm = recursa.LLM(model, exit_policy=ExitPolicy(SPEC, lambda *a: 1.0, Fixed(0.5)), exit_strategy="copy",
                      kv_cache_memory=2**20)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert out.exit_depths == [6] + [2] * 9
    st = llm.stats()
    assert st["stage_tokens"] == 5 * 6 + 9 * 2 and st["copied_kv_layer_tokens"] == 9 * 4
    assert st["head_evals_per_token"] == pytest.approx((1 + 9 * 1) / 10)   # max-prob checks need the head
