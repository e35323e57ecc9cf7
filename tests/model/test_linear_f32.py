"""recursa's fp32 matmul kernel (recursa.kernels.linear_f32) and the CPULinear route to it.

Reference: the same product in float64. The kernel is one fused multiply-add chain per output in
k order, so it must agree with float64 to fp32 summation error, and a row's result must not depend
on how many rows share the call (bit for bit).
"""
import pytest
import torch
import torch.nn.functional as F

from recursa import kernels
from recursa.model.cpu_linear import CPULinear

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")


def _case(rows, n, k, seed=0):
    g = torch.Generator().manual_seed(seed + 7919 * rows + 31 * n + k)
    return torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 12, 13, 24, 32, 33, 100, 400])
@pytest.mark.parametrize("n, k", [(32, 64), (7, 17), (33, 257), (130, 600)])
def test_linear_f32_matches_a_float64_product(rows, n, k):
    x, w = _case(rows, n, k)
    got = kernels.linear_f32(x, kernels.pack_f32(w), n)
    ref = (x.double() @ w.double().T)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    bound = 4 * k * 2**-24 * (x.abs().double() @ w.abs().double().T) + 1e-30   # fp32 summation error
    assert ((got.double() - ref).abs() <= bound).all()


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch():
    x, w = _case(400, 130, 600)
    wp = kernels.pack_f32(w)
    full = kernels.linear_f32(x, wp, 130)
    for rows in (1, 2, 11, 12, 13, 37, 399):   # other row blocks, chunks and passes
        assert torch.equal(kernels.linear_f32(x[:rows], wp, 130), full[:rows])
    assert torch.equal(kernels.linear_f32(x[5:6], wp, 130)[0], full[5])


@needs_kernel
def test_empty_inputs():
    assert kernels.linear_f32(torch.randn(0, 64), kernels.pack_f32(torch.randn(8, 64)), 8).shape == (0, 8)
    assert torch.equal(kernels.linear_f32(torch.randn(3, 0), kernels.pack_f32(torch.randn(8, 0)), 8), torch.zeros(3, 8))


@needs_kernel
def test_leading_dimensions_and_non_contiguous_inputs():
    x, w = _case(24, 40, 64)
    wp = kernels.pack_f32(w)
    x3 = x.view(2, 12, 64)
    assert torch.equal(kernels.linear_f32(x3, wp, 40), kernels.linear_f32(x, wp, 40).view(2, 12, 40))
    strided = torch.randn(64, 24).T   # [24, 64], not contiguous
    assert torch.equal(kernels.linear_f32(strided, wp, 40), kernels.linear_f32(strided.contiguous(), wp, 40))


@needs_kernel
@pytest.mark.parametrize("rows", [3, 24])
def test_compiled_linear_f32_calls_the_same_kernel(rows):
    x, w = _case(rows, 96, 64)
    wp = kernels.pack_f32(w)
    compiled = torch.compile(lambda a: kernels.linear_f32_op(a, wp, 96) * 2, dynamic=True, fullgraph=True)
    assert torch.equal(compiled(x), kernels.linear_f32(x, wp, 96) * 2)


@needs_kernel
def test_fp32_cpu_linear_takes_the_kernel_at_every_row_count(monkeypatch):
    x, w = _case(40, 96, 64)
    bias = torch.randn(96)
    layer = CPULinear.of(torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(bias, requires_grad=False))
    assert layer.packed is None and layer.f32_packed is not None   # no MKL copy beside the kernel's
    calls = []
    real = kernels.linear_f32
    monkeypatch.setattr(kernels, "linear_f32", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, 2, 40):
        torch.testing.assert_close(layer(x[:rows]), F.linear(x[:rows], w, bias), atol=1e-5, rtol=1e-5)
    assert calls == [1, 2, 40]
    assert torch.equal(layer(x[:40])[7], layer(x[7:8])[0])   # the one-row GEMV sums as the row blocks do
