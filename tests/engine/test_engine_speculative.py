"""Self-speculative decoding in the engine is lossless: greedy output equals full-depth greedy decoding.

Reference: tests/reference.py's full_forward_generate (a plain full-sequence forward per new token).
The model's shallow exits agree with its final layer on some tokens and not on others, so drafts
are both accepted and rejected; requests of different lengths arrive at different steps, prefill
is chunked, and a small KV budget preempts requests mid-draft.
"""
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.thresholds import Fixed, make_threshold
from recursa.errors import RecursaError
from recursa.model.exits import ExitSpec, exit_logits
from reference import full_forward_generate, run_arrivals
from tiny_models import agreeing_exit_model

PROMPTS = [[5, 17, 201, 42, 7, 99], list(range(1, 30)), [7] * 9, [200, 2, 3, 4] * 3]


@pytest.fixture(scope="module")
def model():
    return agreeing_exit_model()


def speculative(model, depths=(1,), thr=0.5, max_draft=3, **kw):
    return recursa.LLM(model, exit_policy=ExitPolicy(ExitSpec(depths), "max_prob", Fixed(thr)),
                       exit_strategy="speculative", max_draft=max_draft, **kw)


# 4-token blocks x 4 depths x 2 KV heads x 32 dims x 4 bytes x 2 (K, V): 16 groups hold 64 positions,
# fewer than the four requests need at once, more than the longest (49 tokens) alone
SMALL_KV = dict(block_size=4, kv_cache_memory=16 * 4 * 4 * 2 * 32 * 4 * 2)


@pytest.mark.parametrize("setting", ["batch1", "batched", "chunked", "preempt", "synchronous"])
@pytest.mark.parametrize("depths,thr,max_draft", [((1,), 0.5, 3), ((1, 2), 0.4, 2), ((2,), 0.0, 4)])
def test_speculative_equals_full_depth_greedy(model, setting, depths, thr, max_draft):
    n = 20
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    kw = {"batch1": dict(max_num_seqs=1), "batched": {}, "chunked": dict(max_num_batched_tokens=5),
          "preempt": dict(SMALL_KV, max_num_batched_tokens=8), "synchronous": dict(policy="synchronous")}[setting]
    kw.setdefault("kv_cache_memory", 2**20)
    llm = speculative(model, depths, thr, max_draft, **kw)
    outs = run_arrivals(llm, PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == full_forward_generate(model, prompt, n)
        assert len(out.exit_depths) == n and set(out.exit_depths) <= set(depths) | {model.depth}
    st = llm.stats()
    assert st["draft_tokens"] > st["accepted_draft_tokens"] > 0     # drafts were both accepted and rejected
    assert st["acceptance_rate"] == st["accepted_draft_tokens"] / st["draft_tokens"]
    assert st["head_evals_per_token"] == st["head_tokens"] / st["output_tokens"] > 1   # checks + verification rows
    assert st["output_tokens"] == n * len(PROMPTS)
    assert st["kv_free_blocks"] == st["kv_blocks"]
    assert (st["preemptions"] > 0) == (setting == "preempt")
    assert 1 < st["mean_exit_depth"] < model.depth   # accepted drafts report the depth they came from


def test_draft_length_is_capped_and_adaptive(model):
    """Threshold 0: every decode token may exit, so drafts run max_draft long and each verification
    pass carries max_draft + 1 tokens; threshold above 1: no drafts, plain full depth."""
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = speculative(model, thr=0.0, max_draft=3, kv_cache_memory=2**20)
    out = llm.generate([PROMPTS[0]], p)[0]
    assert out.token_ids == full_forward_generate(model, PROMPTS[0], 16)
    st = llm.stats()
    # every verification is a chunk of <= 4 tokens at depths 1..3; drafts are 1 token at depth 0
    deep_rows = st["stage_tokens"] - len(PROMPTS[0]) * model.depth - st["draft_tokens"] - (st["output_tokens"] - 1)
    assert st["verifications"] >= st["draft_tokens"] / 3
    assert deep_rows <= st["verifications"] * 4 * (model.depth - 1)
    never = speculative(model, thr=1.1, kv_cache_memory=2**20)
    assert never.generate([PROMPTS[0]], p)[0].exit_depths == [model.depth] * 16
    assert never.stats()["draft_tokens"] == 0


@pytest.mark.parametrize("max_tokens", [7, 8, 9, 10])
def test_drafts_at_the_end_and_stop_tokens_are_verified(model, max_tokens):
    """A draft that would end the request (length, a stop token) is verified before it is output."""
    ref = full_forward_generate(model, PROMPTS[0], 30)
    llm = speculative(model, thr=0.0, max_draft=4, kv_cache_memory=2**20)
    fed = []   # chunk ends entering the model: the last output token is never fed
    embed = llm.runner.embed
    llm.runner.embed = lambda seqs: (fed.extend(s.chunk_end for s in seqs), embed(seqs))
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]
    assert out.token_ids == ref[:max_tokens] and out.finish_reason == "length"
    assert max(fed) == len(PROMPTS[0]) + max_tokens - 1
    stop = ref[max_tokens]
    first = ref.index(stop)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                    stop_token_ids=[stop]))[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop"


def test_speculative_on_a_recursive_model():
    """Weight-shared depths go through the same stage API: lossless there too."""
    m = agreeing_exit_model(sharing="cycle", n_loops=2)
    llm = speculative(m, depths=(2,), thr=0.3, kv_cache_memory=2**20)
    outs = run_arrivals(llm, PROMPTS[:3], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == full_forward_generate(m, prompt, 16)
    assert llm.stats()["accepted_draft_tokens"] > 0


class Recorder:
    """A fixed threshold that records every (depth, confidence, agreed) the router observes."""

    def __init__(self, value):
        self.value, self.pairs = value, []

    def __call__(self, step, depth):
        return self.value

    def observe(self, confidence, agreed, depth):
        self.pairs.append((depth, confidence, agreed))


def test_drafts_label_the_exits_they_passed(model):
    """Each verification labels the exits passed by every draft's source up to the first rejected one,
    and the deep token's when all were accepted: in the end every fed decode position labels exit 1
    once, with the confidence and agreement of a full forward over the output (FREE learns from it)."""
    thr = Recorder(0.5)
    llm = recursa.LLM(model, exit_policy=ExitPolicy(ExitSpec((1, 2)), "max_prob", thr),
                      exit_strategy="speculative", kv_cache_memory=2**20)
    n = 30
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    assert llm.stats()["draft_tokens"] > llm.stats()["accepted_draft_tokens"] > 0
    ids = PROMPTS[0] + out.token_ids[:-1]
    with torch.no_grad():
        hidden = model.forward_hidden(torch.tensor([ids]))
        final = model.head(hidden[-1][0]).argmax(-1)
        want = []
        for p in range(len(PROMPTS[0]), len(ids)):
            z = exit_logits(model, hidden[1][0, p], 1)
            want.append((float(torch.softmax(z, -1).max()), int(z.argmax()) == int(final[p])))
    got = sorted((c, a) for d, c, a in thr.pairs if d == 1)
    want = sorted(want)
    assert len(got) == n - 1 and [a for _, a in got] == [a for _, a in want]
    assert [c for c, _ in got] == pytest.approx([c for c, _ in want], abs=1e-4)
    free = make_threshold("free", 0.5, zeta=0.9, min_samples=3)
    llm = recursa.LLM(model, exit_policy=ExitPolicy(ExitSpec((1, 2)), "max_prob", free),
                      exit_strategy="speculative", kv_cache_memory=2**20)
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert out.token_ids == full_forward_generate(model, PROMPTS[0], 40) and set(free.by_depth) == {1, 2}


def test_speculative_refuses_sampling_and_needs_a_policy(model):
    llm = speculative(model, kv_cache_memory=2**20)
    with pytest.raises(RecursaError, match="greedy"):
        llm.add_request("a", PROMPTS[0], SamplingParams(temperature=0.8, max_tokens=4))
    with pytest.raises(RecursaError, match="exit_policy"):
        recursa.LLM(model, exit_strategy="speculative")
    with pytest.raises(RecursaError, match="exit strategy"):
        recursa.LLM(model, exit_strategy="bogus")
    with pytest.raises(RecursaError, match="max_draft"):
        speculative(model, max_draft=0)
