"""recursa's bf16 kernels (recursa.kernels: GEMV, AMX tiles) and the CPULinear projections that pick a CPU matmul.

Reference: F.linear in fp32 on the same bf16 inputs; the kernel accumulates in fp32 and rounds
once, so it must agree to within one bf16 rounding of the output (plus fp32 summation order).
"""
import pytest
import torch
import torch.nn.functional as F

from recursa import kernels
from recursa.model import Decoder
from recursa.model.cpu_linear import CPULinear, use_cpu_kernels_
from recursa.model.quant import fuse_, prepare
from recursa.presets import preset

_kernel = kernels.linear_bf16
_amx = kernels.linear_amx
needs_kernel = pytest.mark.skipif(not kernels.has("linear_bf16"), reason=f"bf16 kernel: {kernels.unavailable_reason() or 'an AVX-512 build only'}")
needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason="no AMX-BF16 (or no permission for its tiles)")


def _reference(x, w):
    return F.linear(x.float(), w.float())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k", [(64, 64), (7, 96), (130, 576)])
def test_kernel_matches_fp32_reference_to_bf16_rounding(rows, n, k):
    g = torch.Generator().manual_seed(n * k + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    got, ref = kernels.linear_bf16(x, w).float(), _reference(x, w)
    assert got.shape == (rows, n) and kernels.linear_bf16(x, w).dtype == torch.bfloat16
    # one bf16 rounding of the result: relative 2^-8, plus a little for the fp32 sum order
    assert ((got - ref).abs() <= ref.abs() * 2**-8 + 1e-3 * k**0.5).all()
    # every row is its own product: no row reads another's input
    for r in range(rows):
        assert torch.equal(kernels.linear_bf16(x[r:r + 1], w)[0], kernels.linear_bf16(x, w)[r])


@needs_amx
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 32, 33, 64, 70])
@pytest.mark.parametrize("n, k", [(64, 64), (7, 96), (130, 576), (48, 1536)])
def test_amx_kernel_matches_fp32_reference_to_bf16_rounding(rows, n, k):
    g = torch.Generator().manual_seed(n * k + rows)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    wp = kernels.pack_amx(w)
    got, ref = kernels.linear_amx(x, wp, n), _reference(x, w)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert ((got.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-3 * k**0.5).all()
    for r in (0, rows // 2, rows - 1):   # a row's result does not depend on the rows beside it
        assert torch.equal(kernels.linear_amx(x[r:r + 1], wp, n)[0], got[r])


@needs_kernel
def test_bf16_linear_routes_small_inputs_to_a_kernel_and_large_ones_to_f_linear():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 64).bfloat16(), requires_grad=False)
    layer = CPULinear.of(w)
    limit = kernels.AMX_MAX_ROWS if kernels.amx_available() else kernels.MAX_ROWS
    small, large = torch.randn(1, limit, 64).bfloat16(), torch.randn(1, limit + 1, 64).bfloat16()
    if kernels.amx_available():
        assert torch.equal(layer(small), kernels.linear_amx(small, layer.amx_packed, 96))
    else:
        assert torch.equal(layer(small), kernels.linear_bf16(small, w))
    assert torch.equal(layer(large), F.linear(large, w))   # oneDNN's prepacked GEMM: the same kernel


@needs_kernel
def test_without_amx_bf16_decode_takes_the_gemv(monkeypatch):
    monkeypatch.setitem(kernels.build._state, "amx", False)
    layer = CPULinear.of(torch.nn.Parameter(torch.randn(32, 64).bfloat16(), requires_grad=False))
    assert layer.amx_packed is None
    x = torch.randn(2, 64).bfloat16()
    assert torch.equal(layer(x), kernels.linear_bf16(x, layer.weight))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 24])
def test_compiled_bf16_linear_calls_the_same_kernel(rows):
    torch.manual_seed(0)
    layer = CPULinear.of(torch.nn.Parameter(torch.randn(32, 64).bfloat16(), requires_grad=False))
    x = torch.randn(1, rows, 64).bfloat16()
    assert torch.equal(torch.compile(layer, dynamic=True)(x), layer(x))


@needs_kernel
def test_prepared_bf16_model_uses_the_kernel_and_keeps_its_logits(monkeypatch):
    torch.manual_seed(0)
    plain = Decoder(preset("tiny")).eval()
    fast = Decoder(preset("tiny")).eval()
    fast.load_state_dict(plain.state_dict())
    fuse_(plain)                      # what prepare does, minus the kernel
    inv_freq = plain.inv_freq
    plain.to(torch.bfloat16)
    plain.inv_freq = inv_freq
    prepare(fast, "bfloat16")
    assert isinstance(fast.lm_head, CPULinear) and fast.lm_head.weight is fast.embed_tokens.weight
    assert sum(isinstance(m, CPULinear) for m in fast.modules()) == 4 * len(fast.layers) + 1
    assert use_cpu_kernels_(fast) == 0   # already routed: nothing left to swap
    ids = torch.tensor([[5, 17, 99]])    # 3 tokens: every matmul at decode size, through the kernel
    calls = []
    if kernels.amx_available():
        monkeypatch.setattr(kernels, "linear_amx", lambda x, wp, n: calls.append(wp) or _amx(x, wp, n))
    else:
        monkeypatch.setattr(kernels, "linear_bf16", lambda x, w: calls.append(w) or _kernel(x, w))
    with torch.no_grad():
        a, b = plain(ids).float(), fast(ids).float()
    assert len(calls) == 4 * len(fast.layers) + 1   # every projection and the head ran the kernel
    assert torch.allclose(a, b, atol=0.05, rtol=0.02)


def test_fp32_cpu_linear_without_the_kernels_matches_f_linear_at_every_size(monkeypatch):
    monkeypatch.setattr(kernels.build, "_state", {})
    monkeypatch.setenv("RECURSA_KERNELS", "0")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(96, 64), requires_grad=False)
    layer = CPULinear.of(w)
    if not torch._C.has_mkl:
        pytest.skip("no MKL")
    assert layer.f32_packed is None and layer.packed is not None
    for rows in (1, kernels.MAX_ROWS, kernels.MAX_ROWS + 1, 40):   # F.linear, then MKL's packed GEMM
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_without_a_compiler_the_kernels_are_off_and_bf16_stays_on_f_linear(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels.build, "_state", {})                     # forget the library loaded so far
    monkeypatch.setenv("RECURSA_KERNEL_CACHE", str(tmp_path))      # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("RECURSA_KERNELS", raising=False)
    if kernels.build.isa() is None:
        pytest.skip("neither AVX512-BF16 nor AVX2: the kernels are off for that reason")
    assert not kernels.available() and "no-such-compiler" in kernels.unavailable_reason()
    assert not any(tmp_path.rglob("*.so*"))                        # no half-built library left behind
    torch.manual_seed(0)
    model = prepare(Decoder(preset("tiny")).eval(), "bfloat16")
    assert not any(isinstance(m, CPULinear) for m in model.modules())
    assert model(torch.tensor([[5, 17, 99]])).isfinite().all()


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(kernels.build, "_state", {})
    monkeypatch.setenv("RECURSA_KERNELS", "0")
    assert not kernels.available() and "RECURSA_KERNELS=0" in kernels.unavailable_reason()
