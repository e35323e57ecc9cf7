"""Mixture-of-Recursions models through the batching engine: exact, with per-token depths.

Reference: `model.forward_mor(ids, mode="causal")` — one plain full-sequence forward of the final
token sequence under the causal routing rule (recursa.model.mor). For both routers, both KV
strategies and Cycle / Middle-Cycle sharing, with requests of different prompt lengths arriving
at different steps and chunked prefill, the engine must take the same routing decision for every
position (recursion steps run), emit the same greedy tokens, and its logits must be within 1e-4.
Depth-wise and synchronous policies give identical outputs.
"""
import pytest
import torch

import recursa
from recursa import SamplingParams
from recursa.config import ModelConfig
from recursa.presets import preset
from recursa.model import Decoder

if "mor_router" not in ModelConfig.__dataclass_fields__:
    pytest.skip("this tree has no Mixture-of-Recursions yet", allow_module_level=True)

PROMPTS = [[5, 17, 99, 3, 250], list(range(1, 30)), [7] * 9, [300, 2, 3, 4] * 3]
ARRIVAL = [0, 2, 7, 15]
MAX_TOKENS = 10


def _model(router: str, kv: str, sharing: str) -> Decoder:
    n_layers = 6 if sharing == "cycle" else 8          # K = 2 shared layers x Nr = 3 (+ first and last)
    torch.manual_seed(11)
    model = Decoder(preset("tiny", n_layers=n_layers, sharing=sharing, n_loops=3, mor_router=router,
                           mor_kv=kv, init_std=0.2)).eval()
    with torch.no_grad():   # decisive routers: scores far from the threshold, so decisions are robust
        for p in model.router.parameters():
            if p.dim() > 1:
                p.normal_(std=1.0)
    return model


def _run(llm, record, max_tokens=MAX_TOKENS):
    real = llm.router.arrive

    def arrive(seqs):
        done = real(seqs)
        for s, row in done:
            if row is not None:
                record[(s.request_id, s.num_tokens - s.num_prompt_tokens)] = row
            if s.chunk_end == s.num_tokens:
                record[(s.request_id, "steps")] = llm.router.steps_run(s)
        return done

    llm.router.arrive = arrive
    done, step, added = {}, 0, 0
    while added < len(PROMPTS) or llm.has_unfinished():
        while added < len(PROMPTS) and ARRIVAL[added] <= step:
            llm.add_request(str(added), PROMPTS[added],
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            added += 1
        done.update({o.request_id: o for o in llm.step() if o.finished})
        step += 1
    return [done[str(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("sharing", ["cycle", "middle_cycle"])
@pytest.mark.parametrize("kv", ["recursion", "share"])
@pytest.mark.parametrize("router", ["expert", "token"])
def test_engine_mor_equals_full_forward(router, kv, sharing):
    model = _model(router, kv, sharing)
    outputs = {}
    for policy in ("depthwise", "synchronous"):
        record = {}
        llm = recursa.LLM(model, policy=policy, max_num_batched_tokens=12, kv_cache_memory=2**20)
        outs = _run(llm, record)
        all_steps = set()
        for r, out in enumerate(outs):
            ids = PROMPTS[r] + out.token_ids
            with torch.no_grad():
                logits, info = model.forward_mor(torch.tensor([ids[:-1]]), mode="causal")
            ref_steps = torch.stack(info["selected"]).sum(0)[0].tolist()   # steps run per position
            assert out.token_ids == logits[0, len(PROMPTS[r]) - 1:].argmax(-1).tolist(), f"{policy} request {r}"
            engine_steps = record[(str(r), "steps")]
            assert [engine_steps[p] for p in range(len(ids) - 1)] == ref_steps, f"{policy} request {r}"
            worst = max((record[(str(r), i)] - logits[0, len(PROMPTS[r]) - 1 + i]).abs().max().item()
                        for i in range(len(out.token_ids)))
            assert worst <= 1e-4
            all_steps.update(ref_steps)
            outside = 0 if sharing == "cycle" else 2
            assert out.exit_depths == [outside + 2 * ref_steps[len(PROMPTS[r]) - 1 + i]
                                       for i in range(len(out.token_ids))]
        assert len(all_steps) >= 2, "routing must send tokens to different depths for this test to mean anything"
        outputs[policy] = [o.token_ids for o in outs]
        stats = llm.stats()
        assert stats["kv_free_blocks"] == stats["kv_blocks"]
    assert outputs["depthwise"] == outputs["synchronous"]


@pytest.mark.parametrize("router,kv,sharing", [("expert", "recursion", "middle_cycle"), ("token", "recursion", "cycle"),
                                                ("expert", "share", "middle_cycle")])
def test_engine_mor_equals_full_forward_through_padded_attention(router, kv, sharing, monkeypatch):
    """The same with every chunk through the padded attention (SDPA over gathered keys), the path
    long prefill chunks take; the in-place kernel reads the short ones above."""
    from recursa.engine import attention

    monkeypatch.setattr(attention, "IN_PLACE_CHUNK", 0)
    monkeypatch.setattr(attention, "IN_PLACE_WORK", 0)
    test_engine_mor_equals_full_forward(router, kv, sharing)


def test_engine_mor_kv_memory():
    """KV sharing reserves one cache layer per unique shared layer; recursion-wise caching writes
    entries only for the tokens that ran a step (fewer than full depth)."""
    full = 6
    shared = recursa.LLM(_model("expert", "share", "cycle"), kv_cache_memory=2**20)
    assert shared.kv.num_cache_layers == 2 and shared.kv.kv_bytes_per_token * full == \
        recursa.LLM(_model("expert", "recursion", "cycle"), kv_cache_memory=2**20).kv.kv_bytes_per_token * 2
    llm = recursa.LLM(_model("expert", "recursion", "cycle"), kv_cache_memory=2**20)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = sum(len(p) + len(o.token_ids) - 1 for p, o in zip(PROMPTS, outs))
    assert llm.stats()["kv_entries_written"] < tokens * full


@pytest.mark.parametrize("router,kv,sharing", [("expert", "recursion", "middle_cycle"), ("token", "share", "cycle")])
def test_engine_mor_preemption_keeps_outputs(router, kv, sharing):
    """A KV pool too small for three requests at once: requests are preempted and recomputed
    (their prefill re-routes every token), and outputs stay those of the full forward."""
    model = _model(router, kv, sharing)
    per_token = recursa.LLM(model, kv_cache_memory=2**20).kv.kv_bytes_per_token
    groups = 10 if kv == "recursion" else 16   # recursion-wise caching holds less: a smaller pool to run short
    llm = recursa.LLM(model, block_size=4, kv_cache_memory=groups * 4 * per_token, max_num_seqs=3,
                      max_num_batched_tokens=12)
    record = {}
    outs = _run(llm, record)
    for r, out in enumerate(outs):
        with torch.no_grad():
            logits, _ = model.forward_mor(torch.tensor([PROMPTS[r] + out.token_ids[:-1]]), mode="causal")
        assert out.token_ids == logits[0, len(PROMPTS[r]) - 1:].argmax(-1).tolist(), f"request {r}"
    assert llm.stats()["preemptions"] > 0


def test_engine_mor_compact_kv_runs_more_requests_at_once():
    """At a fixed KV budget recursion-wise caching runs more requests at once than a cache that
    reserves every depth could (each of those holds its prompt's blocks at all depths), and
    reserves per token about what it writes, far below every depth; outputs stay exact."""
    model = _model("expert", "recursion", "cycle")
    per_token = recursa.LLM(model, kv_cache_memory=2**20).kv.kv_bytes_per_token   # all depths
    bs, groups, prompt_len = 4, 36, 16
    llm = recursa.LLM(model, block_size=bs, kv_cache_memory=groups * bs * per_token, max_num_batched_tokens=64)
    prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(prompt_len)] for i in range(16)]
    for i, p in enumerate(prompts):
        llm.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    peak, done = 0, {}
    while llm.has_unfinished():
        done.update({o.request_id: o for o in llm.step() if o.finished})
        peak = max(peak, len(llm.scheduler.running))
    assert peak > groups // -(-prompt_len // bs)
    st = llm.stats()
    assert st["kv_written_bytes_per_token"] <= st["kv_reserved_bytes_per_token"] < 0.75 * per_token
    assert st["kv_free_blocks"] == st["kv_blocks"]
    for i, p in enumerate(prompts):
        ids = p + done[str(i)].token_ids
        with torch.no_grad():
            logits, _ = model.forward_mor(torch.tensor([ids[:-1]]), mode="causal")
        assert done[str(i)].token_ids == logits[0, prompt_len - 1:].argmax(-1).tolist(), f"request {i}"


def test_engine_mor_progress_order_keeps_runs_full():
    """At a binding token budget the depth-wise policy fills each run with the requests that have
    generated least (engine/policy.py): fewer stage runs than filling in admission order, which lets
    the first requests finish early and leaves part-empty runs for the rest; same outputs."""
    model = _model("expert", "recursion", "middle_cycle")
    prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(4 + i % 3)] for i in range(32)]
    runs, tokens = [], []
    for admission_order in (False, True):
        llm = recursa.LLM(model, max_num_batched_tokens=8)
        if admission_order:
            llm.scheduler.policy.run_order = lambda seqs: seqs
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        runs.append(llm.stats()["stage_runs"])
        tokens.append([o.token_ids for o in outs])
    assert tokens[0] == tokens[1]
    assert runs[0] < 0.95 * runs[1]
