"""Decode spans in one C call (engine/fused_decode.py) against the layer-by-layer eager path.

Every fused span the engine runs is replayed eagerly on a copy of the cache taken before it: the
hidden states and every key/value the span wrote must have the same bits, in bf16, fp32, int8 and
int4 weights, for requests of different lengths decoding side by side. Where a layer cannot be
fused (bf16 past 128 rows, LoRA-relaxed depths) the eager path runs instead.
"""
from types import SimpleNamespace

import pytest
import torch

import recursa
from recursa import SamplingParams, kernels
from recursa.engine.attention import PagedBatch
from recursa.engine.exit_policy import ExitPolicy
from recursa.engine.recursion_kv import EMPTY
from recursa.engine.thresholds import Fixed
from recursa.model import Decoder
from recursa.model.exits import ExitSpec
from recursa.presets import preset
from reference import full_forward_generate
from tiny_models import agreeing_exit_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")
# bf16 past 4 rows and int8/int4 fuse through the AMX tile matmuls only (elsewhere oneDNN / torch's kernels serve)
needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason="no AMX tiles on this CPU (or RECURSA_AMX=0)")

PROMPTS = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [300] * 40, [7, 8],
           list(range(100, 133))]


def _replaying(llm):
    """Wrap the runner's fused path: each call is checked against the eager span on a cache copy.
    Returns (tokens, layers, most tokens of one request) of each fused call."""
    runner, fused = llm.runner, llm.runner.fused
    run, calls = fused.run, []
    captures = llm.captures = []   # capture index of each fused call that captured
    mixed = llm.mixed = []         # per fused call: did its requests sit at different depths

    def checked(batch, x, first, offsets, capture=None):
        kv = runner.kv
        k0, v0 = kv.k.clone(), kv.v.clone()
        out = run(batch, x, first, offsets, capture)
        if out is None:
            return None
        k1, v1 = kv.k.clone(), kv.v.clone()
        kv.k.copy_(k0)
        kv.v.copy_(v0)
        ref, ref_captured = runner.forward(runner.model, kv, batch, x, offsets, first, runner.gqa,
                                           -1 if capture is None else capture[0])
        assert torch.equal(out, ref), f"hidden states differ (rows {x.shape[1]})"
        if capture is not None:   # MoR: the hidden states at the shared block's entry, inside the span
            assert torch.equal(capture[1], ref_captured), "captured hidden states differ"
            captures.append(capture[0])
        assert torch.equal(kv.k, k1) and torch.equal(kv.v, v1), "cache writes differ"
        calls.append((x.shape[1], len(offsets), max(batch.sizes)))
        mixed.append(any(len(o) > 1 for o in offsets))
        return out

    fused.run = checked
    return calls


@pytest.mark.parametrize("dtype, quantization", [pytest.param("bfloat16", None, marks=needs_amx), ("float32", None),
                                                 pytest.param("bfloat16", "int8", marks=needs_amx),
                                                 pytest.param("bfloat16", "int4", marks=needs_amx)])
def test_fused_spans_have_the_eager_bits(dtype, quantization):
    torch.manual_seed(0)
    model = Decoder(preset("tiny")).eval()
    llm = recursa.LLM(model, dtype=dtype, quantization=quantization, kv_cache_memory=2**22, max_num_seqs=8)
    calls = _replaying(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert all(len(o.token_ids) == 12 for o in outs)
    assert (len(PROMPTS), 4, 1) in calls                               # the full batch decoded fused
    assert any(per_request > 16 for _, _, per_request in calls)        # and the prefill (short context)
    one = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(one[0].token_ids) == 3
    assert min(c[0] for c in calls) == 1                                # a lone request fused too


@pytest.mark.parametrize("name", ["mor-tiny", "mor-tiny-token"])
def test_mor_spans_fuse_with_the_eager_bits(name):
    """MoR under recursion-wise caching: each recursion step's span (two layers) reads and writes its
    compact per-layer tables."""
    torch.manual_seed(3)
    model = Decoder(preset(name)).eval()
    llm = recursa.LLM(model, dtype="float32", kv_cache_memory=2**22, max_num_seqs=8)
    assert llm.runner.kv.compact
    calls = _replaying(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert all(len(o.token_ids) == 12 for o in outs)
    assert any(layers > 1 for _, layers, _ in calls), calls   # a whole recursion step in one call
    assert any(layers == 3 for _, layers, _ in calls) and set(llm.captures) == {0}   # the prelude through step 0,
    # the hidden states at the shared block's entry (after the prelude's one layer) captured on the way
    # prefill in chunks of <= 16 tokens: a chunk's queries read their compact tables' prefixes in place
    llm = recursa.LLM(model, kv_cache_memory=2**22, max_num_seqs=8, max_num_batched_tokens=16)
    calls = _replaying(llm)
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert any(per_request > 1 for _, _, per_request in calls), calls


@pytest.mark.parametrize("threshold", [0.0, 0.004])   # every token exits at the first loop end; some do
def test_recursive_spans_mixing_loops_fuse_with_the_eager_bits(threshold):
    """A recursive model with exits at its loop ends, under depth-wise batching over the dense cache:
    requests at different loops of the shared block run one span, each depth reading its own cache
    layer per request (parallel decoding's catch-up puts them there)."""
    from recursa.engine.exit_policy import ExitPolicy
    from recursa.engine.thresholds import Fixed
    from recursa.model.exits import ExitSpec

    torch.manual_seed(5)
    model = Decoder(preset("tiny", n_layers=6, sharing="cycle", n_loops=3)).eval()
    loop_ends = [d + 1 for d in model.structure().loop_ends[:-1]]   # exits after each loop's last depth
    policy = ExitPolicy(ExitSpec(loop_ends), "max_prob", Fixed(threshold))
    llm = recursa.LLM(model, dtype="float32", kv_cache_memory=2**22, max_num_seqs=8, max_num_batched_tokens=8,
                      exit_policy=policy)
    calls = _replaying(llm)
    prompts = [[3 + i] * (2 + 3 * i) for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert all(len(o.token_ids) == 10 for o in outs)
    assert any(m and layers == 2 for m, (_, layers, _) in zip(llm.mixed, calls)), \
        "the test needs requests at different loops in one fused span of a whole loop"


@pytest.mark.skipif(not kernels.has("linear_bf16"), reason="the bf16 GEMV is in AVX-512 builds only")
def test_bf16_gemv_spans_fuse_with_the_eager_bits():
    """bf16 without the AMX copies (a CPU without AMX): up to 4 rows take the AVX512-BF16 GEMV, fused
    and eager alike; more rows go to oneDNN, which only the eager layers call."""
    torch.manual_seed(4)
    model = Decoder(preset("tiny")).eval()
    llm = recursa.LLM(model, dtype="bfloat16", kv_cache_memory=2**22, max_num_seqs=8)
    for module in model.modules():
        if getattr(module, "amx_packed", None) is not None:
            module.amx_packed = None
    calls = _replaying(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert all(len(o.token_ids) == 6 for o in outs)
    assert not calls                                           # 5 requests: more rows than the GEMV takes
    llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert calls and max(c[0] for c in calls) == 3


def test_prefix_lens_refuses_a_visible_set_that_is_not_a_prefix():
    """The in-place kernel reads a row's first entries; a compact table whose visible entries have a
    gap (or are out of position order) must fall back to the masked path."""
    batch = SimpleNamespace(per_layer=True)
    keys = torch.tensor([[0, 3, 5, EMPTY], [1, 2, 9, 4]])
    assert torch.equal(PagedBatch._prefix_lens(batch, keys, torch.tensor([5, 2]), None), torch.tensor([3, 2]))
    assert PagedBatch._prefix_lens(batch, keys, torch.tensor([5, 4]), None) is None        # row 1: 1, 2, 4 seen, 9 not
    chunk = PagedBatch._prefix_lens(batch, keys, torch.tensor([0, 3, 1]), torch.tensor([0, 0, 1]))
    assert torch.equal(chunk, torch.tensor([1, 2, 1]))
    assert torch.equal(PagedBatch._prefix_lens(SimpleNamespace(per_layer=False), keys, torch.tensor([6]), None),
                       torch.tensor([7]))                       # a dense row holds position p at index p


@needs_amx
def test_fused_outputs_equal_the_unfused_engine(monkeypatch):
    """End to end: the same tokens with the fused path off (RECURSA_FUSED_DECODE=0)."""
    torch.manual_seed(1)
    model = Decoder(preset("tiny")).eval()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    fused = recursa.LLM(model, dtype="bfloat16", kv_cache_memory=2**22)
    assert fused.runner.fused.enabled
    monkeypatch.setenv("RECURSA_FUSED_DECODE", "0")
    plain = recursa.LLM(model, dtype="bfloat16", kv_cache_memory=2**22)
    assert not plain.runner.fused.enabled
    assert [o.token_ids for o in fused.generate(PROMPTS, params)] == [o.token_ids for o in plain.generate(PROMPTS, params)]
    assert any(t is not None for t in fused.runner.fused._plans.values())


def test_relaxed_depths_stay_eager():
    """A LoRA-relaxed recursive model's shared depths are never fused (the C span has no adapters),
    and its outputs still come out (through the eager layers)."""
    torch.manual_seed(2)
    model = Decoder(preset("tiny", sharing="cycle", n_loops=2, lora_rank_attn=4, lora_rank_mlp=4)).eval()
    for p in model.lora.parameters():            # non-zero adapters, so that skipping them would show
        torch.nn.init.normal_(p, std=0.02)
    llm = recursa.LLM(model, dtype="float32", kv_cache_memory=2**22)   # dtype: prepared for inference (fused)
    assert model.layers[0].attn.qkv_proj is not None
    calls = _replaying(llm)
    outs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(o.token_ids) == 4 for o in outs)
    assert llm.runner.fused._plans and all(v is None for v in llm.runner.fused._plans.values()) and not calls


@pytest.mark.parametrize("strategy", ["speculative", "parallel"])
def test_exit_chunks_fuse_with_the_eager_bits(strategy):
    """Self-speculative verification (a draft of several tokens per request) and parallel decoding's
    catch-up (exited tokens riding along with the next) are short chunks: they fuse too, with the
    eager bits, and greedy output stays the full model's."""
    model = agreeing_exit_model()
    prompts = [[t % 256 for t in p] for p in PROMPTS]          # its vocabulary
    with torch.no_grad():
        expected = [full_forward_generate(model, p, 10) for p in prompts]
    llm = recursa.LLM(model, dtype="float32", exit_policy=ExitPolicy(ExitSpec((1,)), "max_prob", Fixed(0.5)),
                      exit_strategy=strategy, max_draft=3, kv_cache_memory=2**22)
    calls = _replaying(llm)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    if strategy == "speculative":
        assert [o.token_ids for o in outs] == expected
    assert any(per_request > 1 for _, _, per_request in calls), calls   # a chunk, not one token each
