"""Hand-written CPU kernels, built from C on first use (a C compiler and OpenMP; no torch headers).

`linear_bf16(x, w)`: the bf16 matmul for a few rows (decode at small batch) through AVX512-BF16
dot products (`vdpbf16ps`, fp32 accumulation), reading each weight row once. PyTorch's bf16
F.linear (oneDNN) runs batch-1 GEMV on this kind of CPU at about half the memory bandwidth, below
even fp32 (benchmarks/RESULTS.md), and at batch 1 the weight read is the whole cost of a layer.

`linear_f32(x, wp, n)`: the fp32 matmul from 2 rows up over a weight packed once by `pack_f32`
(panels of 32 output columns, k-major): 12 x 32 register blocks of AVX-512 FMAs (3 x 32 on AVX2), with the next
panel prefetched into L2 while the current one computes. Over SmolLM2's matrices, 2 threads, it
runs 29 ms a step at 8 rows and 42 at 32, against 56 and 66 for F.linear and 40 and 52 for MKL's
packed GEMM (benchmarks/cpu_kernels.py); it is level with MKL's at 128-256 rows, so it replaces
MKL's packed copy (three times the weight's size) for every fp32 batch.

`linear_amx(x, wp, n)`: the bf16 matmul on AMX tiles (TDPBF16PS, fp32 accumulation) over a
weight packed once by `pack_amx`, for up to `AMX_MAX_ROWS` rows: over SmolLM2's matrices, 2
threads, it streamed 12-13 GB/s at 1-4 rows and 9.3 at 32 on a loaded machine, against oneDNN's 10
and 8.2 (benchmarks/cpu_kernels.py), and 24.4 / 20.6 GB/s on a quiet one (oneDNN 18.7 / 16.3), against 30-34 GB/s
for a plain 2-thread read (benchmarks/RESULTS.md, "fifth pass"); level with oneDNN at 64 rows, 4% behind at 128 (RESULTS.md, "sixth pass"). `linear_amx_int(x, wq, sm, n, bits)`
runs the same tiles over int4 or int8 weights (`pack_amx_int4`, `pack_amx_int8`), widening each
tile to bf16 in L1 first: 4.5-9x torch's int4 kernel at 32-256 rows, 4.5-10x its int8 kernel.
They need a CPU with AMX-BF16 (Sapphire Rapids and later) and Linux's permission for the tile
state; elsewhere `amx_available()` is False and callers keep the GEMV, oneDNN and torch's
kernels. RECURSA_AMX=0 turns only these off.

`rms_norm(x, w, eps)`, `silu_mul(gate_up)`, `rope_qk(qkv, cos, sin, ...)`: a layer's
norms, its MLP's activation (bf16) and rope on its queries and keys (bf16, fp32) in one pass each,
in eager mode (about a tenth of a step at 32 tokens went to the
five to eight PyTorch ops each of them takes in bf16).

`row_max(logits)`: greedy decoding's maximum and its index per row (torch.max over a 49k
vocabulary costs ~60 us a row on this CPU).

`paged_decode_attention(q, k_cache, v_cache, slots, offset, lens, rows=None)`: attention of each
query over its request's paged cache (one query per request, or a short chunk's: `rows` maps
queries to slot rows), reading keys/values where they lie (fp32 or bf16; bf16 scores by
AVX512-BF16 dot products, one task per request once there are enough): no gathered copy of the
context, no padding mask, one call per depth instead of a gather, a mask and SDPA.

`decode_span` (C only, driven by recursa.engine.fused_decode): a whole span of decode layers in
one call, chaining the kernels above through function pointers in the eager layer's order, so
its results have the eager layer's bits without its Python (about a third of a bf16 decode step
at 32 tokens on this CPU).

Each source (kernels/*.c) compiles once per source-and-flags hash into ~/.cache/recursa/kernels
(override: RECURSA_KERNEL_CACHE) with `cc -O3 -mavx512f -mavx512bf16 ... -fopenmp` where the CPU
has AVX512-BF16, or `cc -O3 -mavx2 -mfma ...` where it has only AVX2 (`isa()`; kernels/build.py),
written to a temporary file and renamed; the shared library joins the OpenMP runtime torch already loaded (one thread pool).
The AVX2 build holds the kernels written against simd.h (16 fp32 lanes as two registers):
linear_f32, the elementwise passes, paged attention, row_max and decode_span, so fp32 models get
the fused decode path there too (3.3x the eager engine on `small` at batch 1, 2 threads,
benchmarks/RESULTS.md); bf16 tensors pass through them widened and rounded in software, and the
bf16 / int4 / AMX matmuls stay AVX-512 only (`has(name)` says which functions a build has).
RECURSA_KERNEL_ISA=avx2 takes the AVX2 build on an AVX-512 CPU (tests/model/test_kernel_isa.py).
`available()` is False, with the reason in `unavailable_reason()` (`status()`: that, "on", or "on (AVX2: ...)"), where the CPU lacks both,
no compiler is found, or a build fails: callers then keep the PyTorch path (F.linear, SDPA).
RECURSA_KERNELS=0 turns the kernels off. Inside torch.compile the kernels are the opaque custom
ops `recursa::linear_bf16`, `recursa::linear_f32`, `recursa::linear_amx`, `recursa::linear_amx_int` and
`recursa::paged_decode_attention`; the elementwise passes stay out of compiled graphs (inductor
fuses those itself).
"""
from __future__ import annotations

import torch

from recursa.kernels import build
from recursa.kernels.build import amx_available, available, has, isa, status, unavailable_reason
from recursa.kernels.matmul import (AMX_MAX_ROWS, MAX_ROWS, linear_amx, linear_amx_int, linear_bf16, linear_f32,
                                    linear_int4, pack_amx, pack_amx_int4, pack_amx_int8, pack_f32, supports,
                                    supports_f32)
from recursa.kernels.passes import (kv_write, paged_decode_attention, rms_norm, rope_qk, row_max, silu_mul,
                                    supports_attention, supports_elementwise, supports_rope)

# The ops compiled graphs call: declared with a schema and a CPU implementation on a torch.library
# Library (~10 us a call, against ~22 us through torch.library.custom_op's wrapper), plus the fake
# implementations torch.compile traces shapes with.
_LIBRARY = torch.library.Library("recursa", "DEF")
_LIBRARY.define("linear_bf16(Tensor x, Tensor w) -> Tensor")
_LIBRARY.impl("linear_bf16", linear_bf16, "CPU")
_LIBRARY.define("linear_f32(Tensor x, Tensor wp, int n) -> Tensor")
_LIBRARY.impl("linear_f32", linear_f32, "CPU")
_LIBRARY.define("linear_amx(Tensor x, Tensor wp, int n) -> Tensor")
_LIBRARY.impl("linear_amx", linear_amx, "CPU")
_LIBRARY.define("linear_amx_int(Tensor x, Tensor wq, Tensor sm, int n, int bits) -> Tensor")
_LIBRARY.impl("linear_amx_int", linear_amx_int, "CPU")
_LIBRARY.define("linear_int4(Tensor x, Tensor w, Tensor sz, int n, int group) -> Tensor")
_LIBRARY.impl("linear_int4", linear_int4, "CPU")
_LIBRARY.define("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, int offset, "
                "Tensor lens, Tensor? rows=None) -> Tensor")
_LIBRARY.impl("paged_decode_attention", paged_decode_attention, "CPU")


@torch.library.register_fake("recursa::linear_bf16")
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.register_fake("recursa::linear_f32")
def _(x, wp, n):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.register_fake("recursa::linear_amx")
def _(x, wp, n):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.register_fake("recursa::linear_int4")
def _(x, w, sz, n, group):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.register_fake("recursa::linear_amx_int")
def _(x, wq, sm, n, bits):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.register_fake("recursa::paged_decode_attention")
def _(q, k_cache, v_cache, slots, offset, lens, rows=None):
    return torch.empty_like(q)


linear_bf16_op = torch.ops.recursa.linear_bf16
linear_amx_op = torch.ops.recursa.linear_amx
linear_f32_op = torch.ops.recursa.linear_f32
linear_amx_int_op = torch.ops.recursa.linear_amx_int
linear_int4_op = torch.ops.recursa.linear_int4
paged_decode_attention_op = torch.ops.recursa.paged_decode_attention


__all__ = ["AMX_MAX_ROWS", "MAX_ROWS", "amx_available", "available", "build", "kv_write", "linear_amx",
           "linear_amx_int", "linear_amx_int_op", "linear_amx_op", "linear_bf16", "linear_bf16_op", "linear_f32",
           "linear_f32_op", "linear_int4", "linear_int4_op", "pack_amx", "pack_amx_int4", "pack_amx_int8", "pack_f32", "paged_decode_attention",
           "paged_decode_attention_op", "rms_norm", "rope_qk", "row_max", "silu_mul", "supports",
           "supports_attention", "supports_elementwise",
           "supports_f32", "supports_rope", "status", "unavailable_reason"]
