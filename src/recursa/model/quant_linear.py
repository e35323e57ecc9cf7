"""Weight-only int8 and int4 linear layers (built by recursa.model.quant.prepare).

- `Int8Linear`: symmetric int8 per output channel, w = s[n] * q[n, k], q in [-127, 127]. CPU
  kernel `torch._weight_int8pack_mm`, or on AMX CPUs `recursa.kernels.linear_amx_int` at every
  token count (its own tile-ordered copy of the weights; 1.4x at batch 1 and 10-20x at 32 tokens
  on SmolLM2's head shape, 1 thread, benchmarks/cpu_kernels.py).
- `Int4Linear`: affine int4 in groups of `group_size` inputs (32 by default, like GGUF's Q4_1),
  w = scale * q + minimum, q in [0, 15]. CPU kernels: up to `kernels.MAX_ROWS` tokens recursa's
  `kernels.linear_int4` (a GEMV over torch's int4 layout: level with torch's own kernel at one
  token, ~13% behind it at 2-4, but callable from the fused decode span, which makes int4 decode
  at 3 requests ~1.5x faster), above that on AMX CPUs `recursa.kernels.linear_amx_int` (a copy of
  the blocks in tile order, +25% of the int4 bytes, widened to bf16 tile by tile in L1), prefill
  included, else `torch._weight_int4pack_mm_for_cpu`.
  Elsewhere (CUDA) both dequantize to the compute dtype and run F.linear: slower, never wrong.

Both keep nn.Linear's contract (x [..., in] -> [..., out]). The CPU kernels are fast only with
bf16 activations and scales: scales are stored in bf16 and other activations are cast around them.

The int4 CPU kernel's weight layout (torch 2.13, read back in tests/model/test_quant.py):
`_convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)` -> uint8 [N, K/2] holding blocks of
64 output rows; in block b, byte (k, j) has row 64b+j in its low nibble and row 64b+j+32 in its
high one. That is torch's layout on an AVX-512 CPU; on one without AVX-512 (AVX2) its blocks hold
32 rows instead, so `unpack_int4` reads the block size off torch once (`int4_layout_block`). The
matching scales_and_zeros is [K/group, N, 2] with (scale, zero) where the kernel computes
w = (q - 8) * scale + zero, i.e. zero = minimum + 8 * scale. N is padded to a multiple of 64 so
that either layout holds for every row (the padded rows' outputs are cut off).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from recursa import kernels
from recursa.errors import RecursaError

# The CPU int8/int4 kernels are vectorised for bf16 activations only (fp32 inputs run ~10x slower,
# measured in benchmarks/precision.py): scales are kept in bf16 and other inputs are cast to it.
KERNEL_DTYPE = torch.bfloat16
INT4_BLOCK_N = 64  # output rows per block of the CPU int4 layout


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without a dispatch when it already is (the decode path calls this ~400 times a step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _amx_int(x2: torch.Tensor, wq: torch.Tensor, sm: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The AMX integer-weight matmul on [tokens, in] activations (its custom op under torch.compile)."""
    amx = kernels.linear_amx_int_op if torch.compiler.is_compiling() else kernels.linear_amx_int
    return amx(_as(x2, KERNEL_DTYPE), wq, _as(sm, KERNEL_DTYPE), n, bits)


class Int8Linear(nn.Module):
    """y = x @ (scales[:, None] * weight).T with int8 weight [out, in] and scales [out]."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(KERNEL_DTYPE).contiguous())
        amx = weight.device.type == "cpu" and self.in_features % 32 == 0 and kernels.amx_available()
        wq, sm = kernels.pack_amx_int8(self.weight, self.scales) if amx else (None, None)
        self.register_buffer("amx_q", wq, persistent=False)      # the AMX kernel's copy
        self.register_buffer("amx_sm", sm, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor) -> "Int8Linear":
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = (w / scales[:, None]).round().clamp(-127, 127)
        return cls(q.to(torch.int8), scales)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] this module multiplies by."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x)
        if self.amx_q is not None:
            y = _as(_amx_int(x2, self.amx_q, self.amx_sm, self.out_features, 8), x.dtype)
        elif x.device.type == "cpu":
            y = _as(torch._weight_int8pack_mm(_as(x2, KERNEL_DTYPE), self.weight, _as(self.scales, KERNEL_DTYPE)), x.dtype)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def int4_affine(weight: torch.Tensor, group_size: int):
    """Group-wise affine int4 of weight [N, K]: (q uint8 [N, K] in 0..15, scale, minimum [N, K/g]),
    w ~ scale * q + minimum, with each group's min and max represented exactly (fp32)."""
    N, K = weight.shape
    if K % group_size:
        raise RecursaError(f"int4 needs in_features ({K}) to be a multiple of the group size {group_size}")
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
    return q.reshape(N, K).to(torch.uint8), scale, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> the CPU kernel's uint8 layout [N', K/2], N' = N rounded up to 64."""
    N, K = q.shape
    pad = -N % INT4_BLOCK_N
    q = F.pad(q.to(torch.int32), (0, 0, 0, pad))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


@functools.cache
def int4_layout_block() -> int:
    """Output rows per block of torch's int4 CPU layout on this CPU (64 with AVX-512, 32 without):
    the block size under which a packed probe unpacks back to itself."""
    rows = torch.arange(INT4_BLOCK_N, dtype=torch.uint8)
    probe = torch.stack((rows % 16, rows // 16), dim=1)     # every row distinct
    packed = pack_int4(probe)
    for block in (INT4_BLOCK_N, INT4_BLOCK_N // 2):
        if torch.equal(_unpack(packed, block), probe):
            return block
    raise RecursaError("torch's int4 CPU weight layout is not one recursa knows (blocks of 64 or 32 rows)")


def _unpack(packed: torch.Tensor, block: int) -> torch.Tensor:
    Np, K2 = packed.shape
    v = packed.reshape(Np // block, 2 * K2, block // 2)             # [block, k, j]
    q = torch.cat((v & 15, v >> 4), dim=-1)                          # [block, k, rows of the block]
    return q.transpose(1, 2).reshape(Np, 2 * K2)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N', K/2] -> q uint8 [n, K] (see the module docstring)."""
    return _unpack(packed, int4_layout_block())[:n]


class Int4Linear(nn.Module):
    """y = x @ W.T with W[n, k] = scale[n, g] * q[n, k] + minimum[n, g], g = k // group_size."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        zero = minimum.float() + 8 * scale.float()  # the kernel computes (q - 8) * scale + zero
        pad = -self.out_features % INT4_BLOCK_N
        sz = torch.stack((scale.float(), zero), dim=-1)                # [N, K/g, 2]
        sz = F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1)          # [K/g, N', 2]
        self.register_buffer("weight", pack_int4(q.cpu()).to(q.device))
        self.register_buffer("scales_and_zeros", sz.to(KERNEL_DTYPE).contiguous())
        amx = group_size == 32 and q.device.type == "cpu" and self.in_features % 32 == 0 and kernels.amx_available()
        wq, sm = kernels.pack_amx_int4(q, scale, minimum) if amx else (None, None)
        self.register_buffer("amx_q", wq, persistent=False)      # the AMX kernel's copy (> 4 tokens)
        self.register_buffer("amx_sm", sm, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> "Int4Linear":
        return cls(*int4_affine(weight, group_size), group_size)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] this module multiplies by (as the kernel computes it)."""
        q = unpack_int4(self.weight, self.out_features).float()
        sz = self.scales_and_zeros.float()[:, :self.out_features].transpose(0, 1)  # [N, K/g, 2]
        scale = sz[..., 0].repeat_interleave(self.group_size, dim=1)
        zero = sz[..., 1].repeat_interleave(self.group_size, dim=1)
        return (q - 8) * scale + zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(x)
        if self.amx_q is not None and x2.shape[0] > kernels.MAX_ROWS:
            y = _as(_amx_int(x2, self.amx_q, self.amx_sm, self.out_features, 4), x.dtype)
        elif x.device.type == "cpu" and x2.shape[0] <= kernels.MAX_ROWS and kernels.build.has("linear_int4"):
            gemv = kernels.linear_int4_op if torch.compiler.is_compiling() else kernels.linear_int4
            y = _as(gemv(_as(x2, KERNEL_DTYPE), self.weight, _as(self.scales_and_zeros, KERNEL_DTYPE), self.out_features,
                         self.group_size), x.dtype)
        elif x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(_as(x2, KERNEL_DTYPE), self.weight, self.group_size,
                                                  _as(self.scales_and_zeros, KERNEL_DTYPE))
            y = _as(y if y.shape[-1] == self.out_features else y[:, :self.out_features], x.dtype)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
