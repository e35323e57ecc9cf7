"""Early exit in the batching engine (synchronized parallel decoding at batch > 1) is exact.

Reference: one plain full-sequence forward of the final token sequence (every token at every
depth, i.e. exactly the KV that parallel decoding must fill in), replaying the same exit rule
token by token: at each exit depth of a decoded token, exit if the measure on that exit's
logits clears the threshold, else go on. The engine, with several requests of different
lengths arriving at different steps and tokens of one request exiting at different depths,
must emit the same tokens from the same depths, with logits within 1e-4.
"""
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.presets import preset
from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.thresholds import Fixed
from recursa.errors import RecursaError
from recursa.model import Decoder
from recursa.model.exits import ExitSpec, exit_logits
from reference import replay_exit_rule

PROMPTS = [[5, 17, 99, 3, 250], list(range(1, 30)), [7] * 9, [300, 2, 3, 4] * 3]
ARRIVAL = [0, 2, 7, 15]
MAX_TOKENS = 14


def measure(logits, h, prev, depth):
    """A deterministic stand-in confidence that exits at both exits and goes deep, token by token
    (an untrained model is never sure, and repeats one token: read a hidden feature instead)."""
    return float(h[depth] > 0.0)


def _model(**kw) -> Decoder:
    torch.manual_seed(7)
    return Decoder(preset("tiny", n_layers=6, init_std=0.2, **kw)).eval()   # 0.2: tokens vary


def _reference(model, spec, prompt, out):
    """(tokens, exit depths, logits) the exit rule gives on the full forward of prompt + out."""
    with torch.no_grad():
        hidden = model.forward_hidden(torch.tensor([prompt + out[:-1]]))
    return replay_exit_rule(model, hidden, len(prompt), len(out), spec.depths, measure)


def _run(llm, record):
    real = llm.router.arrive

    def arrive(seqs):
        done = real(seqs)
        record.extend((s.request_id, s.num_tokens - s.num_prompt_tokens, row) for s, row in done if row is not None)
        return done

    llm.router.arrive = arrive
    done, step, added = {}, 0, 0
    while added < len(PROMPTS) or llm.has_unfinished():
        while added < len(PROMPTS) and ARRIVAL[added] <= step:
            llm.add_request(str(added), PROMPTS[added], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                       ignore_eos=True))
            added += 1
        done.update({o.request_id: o for o in llm.step() if o.finished})
        step += 1
    return [done[str(i)] for i in range(len(PROMPTS))]


# 4-token block groups at 6 depths x 2 KV heads x 32 dims x 4 bytes x 2 (K, V): 16 of them hold 64 tokens,
# the longest request needs 11 and three at once need about 22
PREEMPT = dict(block_size=4, kv_cache_memory=16 * 4 * 6 * 2 * 32 * 4 * 2, max_num_seqs=3)


@pytest.mark.parametrize("shape", [dict(), dict(sharing="cycle", n_loops=3)], ids=["vanilla", "recursive"])
@pytest.mark.parametrize("policy", ["depthwise", "synchronous", "preempt"])
def test_engine_early_exit_equals_full_forward(shape, policy):
    model = _model(**shape)
    spec = ExitSpec((2, 4))
    budget = PREEMPT if policy == "preempt" else dict(kv_cache_memory=2**20)
    llm = recursa.LLM(model, exit_policy=ExitPolicy(spec, measure, Fixed(0.5)),
                      policy="depthwise" if policy == "preempt" else policy, max_num_batched_tokens=12, **budget)
    record = []
    outs = _run(llm, record)
    rows = {(rid, i): row for rid, i, row in record}
    depths_seen = set()
    for r, out in enumerate(outs):
        tokens, depths, ref_rows = _reference(model, spec, PROMPTS[r], out.token_ids)
        assert out.token_ids == tokens, f"request {r}"
        assert out.exit_depths == depths, f"request {r}"
        worst = max((rows[(str(r), i)] - ref).abs().max().item() for i, ref in enumerate(ref_rows))
        assert worst <= 1e-4
        depths_seen.update(depths)
    assert depths_seen == {2, 4, 6}           # tokens left at every exit, and some went full depth
    stats = llm.stats()
    assert stats["kv_free_blocks"] == stats["kv_blocks"]
    assert 2 < stats["mean_exit_depth"] < 6
    assert (stats["preemptions"] > 0) == (policy == "preempt")


def test_engine_early_exit_saves_stage_work():
    """Exited tokens skip their deep stages until the next deep token carries them: fewer token-stage
    passes than full depth, but every position still reaches every depth once (exact KV)."""
    model = _model()
    spec = ExitSpec((2, 4))
    never = recursa.LLM(model, exit_policy=ExitPolicy(spec, lambda *a: 0.0, Fixed(0.5)), kv_cache_memory=2**20)
    always = recursa.LLM(model, exit_policy=ExitPolicy(spec, lambda *a: 1.0, Fixed(0.5)), kv_cache_memory=2**20)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = recursa.LLM(model, kv_cache_memory=2**20).generate([PROMPTS[0]], p)[0]
    assert never.generate([PROMPTS[0]], p)[0].token_ids == full.token_ids
    out = always.generate([PROMPTS[0]], p)[0]
    assert out.exit_depths == [6] + [2] * 9
    # prefill 5 tokens x 6 depths, then 9 decode tokens x 2 depths; the last 9 tokens' deep passes never ran
    assert always.stats()["stage_tokens"] == 5 * 6 + 9 * 2
    assert never.stats()["stage_tokens"] == 5 * 6 + 9 * 6


def test_engine_rejects_exit_policy_beyond_depth():
    with pytest.raises(RecursaError):
        recursa.LLM(_model(), exit_policy=ExitPolicy(ExitSpec((6,)), measure, Fixed(0.5)))


def test_preemption_does_not_change_early_exit_outputs():
    """A request preempted mid-generation is recomputed from its prompt + outputs; its newest token still
    runs as a decode token, so it exits where the rule says (not full depth as a prefill token would)."""
    model = _model()
    spec = ExitSpec((2, 4))
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def make():
        return recursa.LLM(model, exit_policy=ExitPolicy(spec, lambda *a: 1.0, Fixed(0.5)), kv_cache_memory=2**20)

    alone = make().generate([PROMPTS[0]], p)[0]
    llm = make()
    llm.add_request("r", PROMPTS[0], p)
    out, preempted = None, False
    while llm.has_unfinished():
        for o in llm.step():
            out = o
        seq = llm.seqs.get("r")
        if not preempted and seq is not None and len(seq.output_token_ids) == 4 and not seq.in_flight:
            llm.scheduler.preempt(seq)     # what memory pressure does: free its KV, recompute later
            preempted = True
    assert preempted and llm.stats()["preemptions"] == 1
    assert out.token_ids == alone.token_ids and out.exit_depths == alone.exit_depths == [6] + [2] * 9


@pytest.mark.parametrize("policy", ["depthwise", "synchronous"])
def test_head_free_saturation_exits_run_one_head_per_token(policy):
    """Saturation (a hidden-state measure) with a fixed threshold decides without logits: the LM head
    runs once per output token, at the depth it is emitted from. Reference: the exit rule replayed on
    one full forward, cosine to the previous exit (the first exit: one layer below)."""
    model = _model()
    spec = ExitSpec((2, 4))
    threshold = 0.7
    llm = recursa.LLM(model, exit_policy=ExitPolicy(spec, "saturation", Fixed(threshold)), policy=policy,
                      kv_cache_memory=2**20, max_num_batched_tokens=12)
    outs = _run(llm, [])
    depths_seen = set()
    for r, out in enumerate(outs):
        ids = torch.tensor([PROMPTS[r] + out.token_ids[:-1]])
        with torch.no_grad():
            hidden = model.forward_hidden(ids)
        tokens, depths = [], []
        for i in range(len(out.token_ids)):
            p = len(PROMPTS[r]) + i - 1
            d, logits = model.depth, None
            for e, ref in ((2, 1), (4, 2)) if i > 0 else ():
                if torch.cosine_similarity(hidden[e][0, p], hidden[ref][0, p], dim=0) >= threshold:
                    d, logits = e, exit_logits(model, hidden[e][0, p], e)
                    break
            logits = model.head(hidden[-1][0, p]) if logits is None else logits
            tokens.append(int(logits.argmax()))
            depths.append(d)
        assert out.token_ids == tokens and out.exit_depths == depths, f"request {r}"
        depths_seen.update(depths)
    stats = llm.stats()
    assert depths_seen == {2, 4, 6}                                 # tokens leave at both exits and go deep
    assert stats["head_tokens"] == stats["output_tokens"]           # one head evaluation per output token
