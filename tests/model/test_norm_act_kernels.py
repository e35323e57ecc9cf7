"""recursa's fused bf16 RMSNorm and SiLU-multiply kernels against the PyTorch ops they replace.

Reference: the same bf16 ops in PyTorch (F.rms_norm then a bf16 multiply; F.silu then a bf16
multiply). Both round where PyTorch rounds, so they may differ only where an fp32 value lies
within an fp32 summation-order / exp-approximation error of a bf16 rounding boundary: at most
one bf16 step, on a small fraction of the elements.
"""
import pytest
import torch
import torch.nn.functional as F

from recursa import kernels
from recursa.model import Decoder
from recursa.model.quant import prepare
from recursa.presets import preset

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")


def _close_to_bf16_step(got, ref):
    step = ref.float().abs() * 2**-7 + 1e-30
    diff = (got.float() - ref.float()).abs()
    assert (diff <= step).all()
    assert (diff > 0).float().mean() < 0.02


@pytest.mark.parametrize("rows, dim", [(1, 64), (7, 576), (33, 128)])
def test_rms_norm_matches_pytorch_bf16(rows, dim):
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=g) * 3).bfloat16()
    w = (torch.rand(dim, generator=g) + 0.5).bfloat16()
    with torch.no_grad():
        _close_to_bf16_step(kernels.rms_norm(x, w, 1e-5), w * F.rms_norm(x, (dim,), eps=1e-5))
        _close_to_bf16_step(kernels.rms_norm(x, None, 1e-5), F.rms_norm(x, (dim,), eps=1e-5))


@pytest.mark.parametrize("rows, ffn", [(1, 64), (5, 1536)])
def test_silu_mul_matches_pytorch_bf16(rows, ffn):
    g = torch.Generator().manual_seed(rows + ffn)
    gate_up = (torch.randn(rows, 2 * ffn, generator=g) * 4).bfloat16()
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).bfloat16()   # saturated tails, zero
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.no_grad():
        got = kernels.silu_mul(gate_up)
    assert got.shape == (rows, ffn)
    _close_to_bf16_step(got, F.silu(gate) * up)


@pytest.mark.parametrize("rows, dim", [(1, 64), (7, 576), (33, 128)])
def test_rms_norm_matches_pytorch_fp32(rows, dim):
    g = torch.Generator().manual_seed(rows * dim)
    x = torch.randn(rows, dim, generator=g) * 3
    w = torch.rand(dim, generator=g) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (dim,), w, eps=1e-5),
                                   rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(kernels.rms_norm(x, None, 1e-5), F.rms_norm(x, (dim,), eps=1e-5),
                                   rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("rows, ffn", [(1, 64), (5, 1536)])
def test_silu_mul_matches_pytorch_fp32(rows, ffn):
    g = torch.Generator().manual_seed(rows + ffn)
    gate_up = torch.randn(rows, 2 * ffn, generator=g) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])   # saturated tails, zero
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.no_grad():
        got = kernels.silu_mul(gate_up)
    assert got.shape == (rows, ffn) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=2e-6, atol=1e-6)


def test_the_bf16_model_uses_them_in_inference_only(monkeypatch):
    torch.manual_seed(0)
    model = prepare(Decoder(preset("tiny")).eval(), "bfloat16")
    calls = []
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append("norm") or torch.zeros_like(a[0]))
    ids = torch.tensor([[5, 17, 99]])
    with torch.no_grad():
        model(ids)
    assert calls.count("norm") == 2 * len(model.layers) + 1          # two per block and the final norm
    calls.clear()
    with torch.enable_grad():
        model(ids)                                                    # autograd: PyTorch's own ops
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_gives_pytorchs_bits(dtype):
    from recursa.model.layers import apply_rope, rope_cos_sin, rope_frequencies

    torch.manual_seed(0)
    n, heads, kv_heads, hd = 5, 3, 1, 64
    flat = torch.randn(1, n, (heads + 2 * kv_heads) * hd).to(dtype)
    flat[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -2.0])
    cos, sin = rope_cos_sin(rope_frequencies(hd, 10000.0), torch.tensor([0, 1, 7, 100, 4000]), dtype)
    qkv = flat.view(1, n, heads + 2 * kv_heads, hd).transpose(1, 2)
    ref = apply_rope(qkv[:, :heads + kv_heads], cos, sin)
    with torch.no_grad():
        got = kernels.rope_qk(flat, cos, sin, heads + kv_heads, hd)
    assert got.shape == ref.shape and torch.equal(got, ref)   # same roundings: the same bits, signed zeros too
    assert torch.equal(torch.signbit(got), torch.signbit(ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_max_is_torch_max(dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 1000).to(dtype)          # 1000: a tail past the last full vector
    x[1, 3] = x[1, 900] = 50.0                   # a tie: the first index, as torch.max gives it
    x[2, 999] = 60.0                             # the maximum in the tail
    x[3, 500] = float("nan")                     # a row that cannot be sampled
    x[4] = float("-inf")
    x[5, 7] = float("inf")
    best, index = kernels.row_max(x)
    ref_best, ref_index = x.float().max(dim=-1)
    assert torch.equal(best.isnan(), ref_best.isnan()) and best.isnan().tolist() == [False, False, False, True, False, False]
    ok = ~ref_best.isnan()
    assert torch.equal(best[ok], ref_best[ok]) and torch.equal(index[ok], ref_index[ok])
    assert index[1] == 3 and index[2] == 999 and index[5] == 7


def test_an_ffn_the_kernel_cannot_tile_keeps_pytorchs_ops(monkeypatch):
    from recursa.model.layers import MLP

    cfg = preset("tiny").replace(ffn_dim=40)   # 40: not a multiple of 16
    mlp = MLP(cfg).to(torch.bfloat16)
    mlp.fuse()
    monkeypatch.setattr(kernels, "silu_mul", lambda gu: pytest.fail("the kernel got ffn=40"))
    with torch.no_grad():
        assert mlp(torch.randn(1, 3, cfg.dim).bfloat16()).shape == (1, 3, cfg.dim)
