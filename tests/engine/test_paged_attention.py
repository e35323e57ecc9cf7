"""recursa's in-place paged decode attention (recursa.kernels) against gather + masked SDPA.

The reference gathers each request's keys/values from the slots, masks positions past its
length, and runs F.scaled_dot_product_attention in fp32; the kernel must agree to fp32 rounding
(fp32 cache) or bf16 rounding of the output (bf16 cache), for every request length, GQA group
and slot offset, and the engine must take this path for decode over a dense cache.
"""
import pytest
import torch
import torch.nn.functional as F

import recursa
from recursa import SamplingParams, kernels
from recursa.engine.attention import PagedBatch
from recursa.model import Decoder
from recursa.presets import preset

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")


def _reference(q, kc, vc, slots, offset, lens):
    keys, values = kc[slots + offset].permute(0, 2, 1, 3).float(), vc[slots + offset].permute(0, 2, 1, 3).float()
    mask = (torch.arange(slots.shape[1])[None, :] < lens[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.float()[:, :, None], keys, values, attn_mask=mask,
                                          enable_gqa=True)[:, :, 0]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 32), (9, 3, 64), (4, 4, 16)])
@pytest.mark.parametrize("sharpness", [1.0, 12.0])   # 12: most weights underflow, a few dominate
def test_kernel_matches_gathered_sdpa(dtype, tol, heads, kv_heads, head_dim, sharpness):
    g = torch.Generator().manual_seed(heads * head_dim)
    kc = torch.randn(1400, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(1400, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 17, 40, 3, 64, 200])
    slots = torch.randperm(1300, generator=g)[:6 * 200].view(6, 200).contiguous()   # scattered, as a block table gives
    q = (sharpness * torch.randn(6, heads, head_dim, generator=g)).to(dtype)
    for offset in (0, 64):
        out = kernels.paged_decode_attention(q, kc, vc, slots, offset, lens)
        ref = _reference(q, kc, vc, slots, offset, lens)
        assert out.dtype == dtype and out.shape == q.shape
        assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    # positions past a request's length are never read: poisoning them changes nothing
    kc2, vc2 = kc.clone(), vc.clone()
    past = slots[0, 1:]
    kc2[past], vc2[past] = float("nan"), float("nan")
    assert torch.equal(kernels.paged_decode_attention(q, kc2, vc2, slots, 0, lens)[0],
                       kernels.paged_decode_attention(q, kc, vc, slots, 0, lens)[0])


def test_engine_decodes_through_the_kernel(monkeypatch):
    torch.manual_seed(0)
    model = Decoder(preset("tiny")).eval()
    calls = []
    kernel = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    llm = recursa.LLM(model, kv_cache_memory=2**21)
    outs = llm.generate([[5, 17, 99], [1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(o.token_ids) == 4 for o in outs)
    # the two prompts' prefill (8 tokens: a short chunk attends in place too), then decode of both
    assert calls and sorted(set(calls)) == [2, 8] and len(calls) % len(model.layers) == 0


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunk_queries_read_their_requests_rows(dtype, tol):
    """Several queries per request (a short chunk): query i reads slot row rows[i] up to lens[i]."""
    g = torch.Generator().manual_seed(7)
    kc = torch.randn(900, 3, 64, generator=g).to(dtype)
    vc = torch.randn(900, 3, 64, generator=g).to(dtype)
    slots = torch.randperm(800, generator=g)[:3 * 100].view(3, 100).contiguous()
    rows = torch.tensor([0, 0, 0, 2, 1, 1])                    # request 0: 3 tokens, 2: 1, 1: 2
    lens = torch.tensor([10, 11, 12, 40, 1, 2])                # each query sees up to its own position
    q = torch.randn(6, 9, 64, generator=g).to(dtype)
    out = kernels.paged_decode_attention(q, kc, vc, slots, 0, lens, rows)
    ref = _reference(q, kc, vc, slots[rows], 0, lens)
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.equal(out[3:4], kernels.paged_decode_attention(q[3:4], kc, vc, slots[2:3], 0, lens[3:4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_is_index_copy(dtype):
    torch.manual_seed(0)
    kc, vc = torch.randn(40, 3, 64).to(dtype), torch.randn(40, 3, 64).to(dtype)
    ref_k, ref_v = kc.clone(), vc.clone()
    qkv = torch.randn(1, 9, 5, 64).to(dtype)          # [1, heads, n, hd]: k and v as strided views
    k, v = qkv[0, 3:6].transpose(0, 1), qkv[0, 6:9].transpose(0, 1)
    slots = torch.tensor([7, 0, 39, 12, 13])
    assert kernels.kv_write(kc, vc, slots, k, v)
    ref_k.index_copy_(0, slots, k)
    ref_v.index_copy_(0, slots, v)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    with pytest.raises(IndexError):
        kernels.kv_write(kc, vc, torch.tensor([1, 2, 3, 4, 40]), k, v)
    assert torch.equal(kc, ref_k)                       # nothing written
