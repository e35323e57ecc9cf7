"""The batching engine agrees with independent references, token for token.

References: argmax of the plain full-sequence forward `model(ids)` (recomputed from scratch
for every token) and the plain full forward (tests/reference.py). Requests of
different prompt lengths arrive at different steps; both stage policies, chunked prefill (tiny
token budget) and preemption (tiny KV budget) must not change a single token.
"""
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.presets import preset
from reference import full_forward_generate
from recursa.errors import RecursaError
from recursa.model import Decoder

PROMPTS = [[5, 17, 99, 3, 250], list(range(1, 41)), [7] * 9, [1000, 2, 3, 4] * 6, [42]]
ARRIVAL = [0, 0, 3, 11, 40]          # engine step at which each request is added
MAX_TOKENS = [12, 20, 16, 9, 14]


def LLM(model, **engine_args):
    """The engine with a small KV pool unless a test sets one (the default sizes for 256 requests)."""
    engine_args.setdefault("kv_cache_memory", 2**21)
    return recursa.LLM(model, **engine_args)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(preset("tiny")).eval()


@pytest.fixture(scope="module")
def reference(model):
    """Greedy continuation by full forward argmax, plus the logits at every generated token."""
    out = []
    with torch.no_grad():
        for prompt, n in zip(PROMPTS, MAX_TOKENS):
            ids, logits = list(prompt), []
            for _ in range(n):
                row = model(torch.tensor([ids]))[0, -1]
                logits.append(row)
                ids.append(int(row.argmax()))
            out.append((ids[len(prompt):], torch.stack(logits)))
    return out


def _run_staggered(llm, params_for=lambda i: None):
    """Add PROMPTS at ARRIVAL steps, step until done; {request index: final output}."""
    done, step, added = {}, 0, 0
    while added < len(PROMPTS) or llm.has_unfinished():
        while added < len(PROMPTS) and ARRIVAL[added] <= step:
            params = params_for(added) or SamplingParams(temperature=0, max_tokens=MAX_TOKENS[added], ignore_eos=True)
            llm.add_request(str(added), PROMPTS[added], params)
            added += 1
        for out in llm.step():
            if out.finished:
                done[int(out.request_id)] = out
        step += 1
    return done


CASES = {
    "default": dict(),
    "chunked": dict(max_num_batched_tokens=7),
    # 4-token blocks, 72 blocks = 18 per depth: the longest request alone needs 15
    "preempt": dict(block_size=4, kv_cache_memory=72 * 4 * 512),
    "chunked+preempt": dict(block_size=4, kv_cache_memory=72 * 4 * 512, max_num_batched_tokens=5, max_num_seqs=3),
}


@pytest.mark.parametrize("policy", ["depthwise", "fullest", "synchronous"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_full_forward(model, reference, policy, case):
    llm = LLM(model, policy=policy, **CASES[case])
    worst, rows = 0.0, 0
    real = llm.router.arrive

    def arrive(seqs):  # compare each logits row sampled from with the full forward's row for that token
        nonlocal worst, rows
        done = real(seqs)
        for s, row in done:
            if row is not None:
                ref = reference[int(s.request_id)][1][s.num_tokens - s.num_prompt_tokens]
                worst, rows = max(worst, (row - ref).abs().max().item()), rows + 1
        return done

    llm.router.arrive = arrive
    budget = llm.config.max_num_batched_tokens
    run_span = llm.runner.run_span

    def checked_run_span(seqs):  # the budgets hold at every span run, which covers the whole model
        assert sum(s.chunk_len for s in seqs) <= budget
        assert len(llm.scheduler.running) <= llm.config.max_num_seqs
        assert {s.depth for s in seqs} == {0} and llm.runner.span_len[0] == model.depth
        run_span(seqs)

    llm.runner.run_span = checked_run_span
    done = _run_staggered(llm)
    for i, (tokens, _) in enumerate(reference):
        assert done[i].token_ids == tokens, f"request {i}"
        assert done[i].finish_reason == "length"
        assert done[i].prompt_token_ids == PROMPTS[i]
    assert rows >= sum(MAX_TOKENS) and worst <= 1e-4
    stats = llm.stats()
    assert stats["kv_free_blocks"] == stats["kv_blocks"]  # everything freed at the end
    if "preempt" in case:
        assert stats["preemptions"] > 0


def test_equals_single_request_decoder_and_policies_agree(model):
    expected = [full_forward_generate(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    for policy in ("depthwise", "synchronous"):
        outs = LLM(model, policy=policy, max_num_batched_tokens=16).generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == expected


def test_vanilla_model_runs_one_span_per_step(model):
    """A vanilla model is one span: every step runs the whole stack once (one Python step per token round)."""
    llm = LLM(model)
    steps = 0
    real = llm.runner.run_span

    def run_span(seqs):
        nonlocal steps
        steps += 1
        real(seqs)

    llm.runner.run_span = run_span
    _run_staggered(llm)
    stats = llm.stats()
    assert llm.boundaries == [0, model.depth]
    assert stats["span_runs"] == steps and stats["stage_runs"] == steps * model.depth


def test_seeded_sampling_reproducible_and_batch_independent(model):
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=123, max_tokens=15, ignore_eos=True)
    alone = LLM(model).generate([PROMPTS[0]], params)[0].token_ids
    crowd = LLM(model, max_num_batched_tokens=8).generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [SamplingParams(temperature=1.0, max_tokens=15, seed=5), params, SamplingParams(temperature=0, max_tokens=15)],
    )[1].token_ids
    assert alone == crowd
    assert alone == full_forward_generate(model, PROMPTS[0], 15, temperature=0.9, top_k=50, top_p=0.9, seed=123)
    assert alone != LLM(model).generate([PROMPTS[0]], SamplingParams(temperature=0.9, seed=124, max_tokens=15))[0].token_ids


def test_stop_token_ids_and_eos(model):
    greedy = full_forward_generate(model, PROMPTS[1], 10)
    llm = LLM(model)
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[greedy[4]]))[0]
    stop_at = greedy.index(greedy[4])
    assert out.token_ids == greedy[:stop_at + 1] and out.finish_reason == "stop"
    model.cfg.eos_token_id = greedy[2]
    try:
        eos_llm = LLM(model)
        stopped = eos_llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10))[0]
        ignored = eos_llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    finally:
        model.cfg.eos_token_id = None
    assert stopped.token_ids == greedy[:greedy.index(greedy[2]) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == greedy and ignored.finish_reason == "length"


def test_abort_frees_memory_and_spares_the_others(model):
    llm = LLM(model, policy="depthwise")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.add_request("keep", PROMPTS[1], params)
    llm.add_request("drop", PROMPTS[0], params)
    for _ in range(10):
        llm.step()
    assert llm.abort_request("drop") and not llm.abort_request("drop")
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    assert {o.request_id for o in outs} == {"keep"}
    assert outs[-1].token_ids == full_forward_generate(model, PROMPTS[1], 20)
    assert llm.stats()["kv_free_blocks"] == llm.stats()["kv_blocks"]


def test_streaming_deltas_add_up(model):
    llm = LLM(model)
    llm.add_request("r", PROMPTS[2], SamplingParams(temperature=0, max_tokens=6))
    deltas, last = [], None
    while llm.has_unfinished():
        for out in llm.step():
            deltas += out.delta_token_ids
            last = out
    assert deltas == last.token_ids == full_forward_generate(model, PROMPTS[2], 6) and last.finished


def test_bad_requests_are_user_errors(model):
    llm = LLM(model)
    with pytest.raises(RecursaError, match="empty"):
        llm.add_request("a", [], None)
    with pytest.raises(RecursaError, match="vocabulary"):
        llm.add_request("a", [model.cfg.vocab_size], None)
    with pytest.raises(RecursaError, match="max_model_len"):
        llm.add_request("a", [1] * model.cfg.max_seq_len, None)
    with pytest.raises(RecursaError, match="tokenizer"):
        llm.add_request("a", "text", None)
    llm.add_request("a", [1, 2], None)
    with pytest.raises(RecursaError, match="already"):
        llm.add_request("a", [1, 2], None)
    with pytest.raises(RecursaError, match="KV blocks"):
        LLM(model, block_size=4, kv_cache_memory=8 * 4 * 512).generate([1] * 30, SamplingParams(max_tokens=5))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-2), dict(stop=[""])):
        with pytest.raises(RecursaError):
            SamplingParams(**bad)
    with pytest.raises(RecursaError, match="policy"):
        LLM(model, policy="fastest")


@pytest.mark.slow
def test_compiled_layers_give_the_same_tokens(model):
    """compile=True (torch.compile of each layer, dynamic shapes) decodes what eager decoding does."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    eager = LLM(model, max_num_batched_tokens=16).generate(PROMPTS, params)
    compiled = LLM(model, max_num_batched_tokens=16, compile=True).generate(PROMPTS, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]


def test_warm_up_runs_every_step_kind_and_leaves_nothing_behind(model):
    llm = LLM(model, max_num_seqs=40)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.token_ids for o in llm.generate(PROMPTS, params)]
    free = llm.kv.num_free_blocks
    steps = []
    real = llm.step
    llm.step = lambda: steps.append(len(llm.scheduler.running)) or real()
    llm.warm_up()
    llm.step = real
    assert not llm.has_unfinished() and llm.kv.num_free_blocks == free
    assert max(steps) == 40 and 1 in steps          # one request alone, and a batch of max_num_seqs
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == before


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "bfloat16"])   # bf16: the matmul kind changes at AMX_MAX_ROWS
def test_a_warmed_up_compiled_engine_does_not_compile_again(model, dtype):
    import copy

    import torch._dynamo.utils as dynamo_utils

    llm = LLM(copy.deepcopy(model) if dtype else model, dtype=dtype, max_num_seqs=40, compile=True)
    llm.warm_up()
    frames = dynamo_utils.counters["frames"]["ok"]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    llm.generate([[3] * 45], params)                    # a long prompt alone (the recompile warm_up prevents)
    llm.generate([[4 + i] * (5 + i) for i in range(7)], params)
    assert dynamo_utils.counters["frames"]["ok"] == frames
