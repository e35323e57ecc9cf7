"""Projections that pick the fastest CPU matmul for the number of tokens they see.

At decode sizes a matmul reads its whole weight for a few rows. bf16 goes to
`recursa.kernels.linear_amx` up to `kernels.AMX_MAX_ROWS` tokens where the CPU has AMX (tiles over
a second, tile-ordered copy of the weight), else to `recursa.kernels.linear_bf16` up to
`kernels.MAX_ROWS` (AVX512-BF16 GEMV, about twice oneDNN's speed at batch 1), and past that to
oneDNN's prepacked GEMM (`torch.ops.mkldnn._linear_pointwise` on a reordered weight, 1.15-1.35x
F.linear, bit-identical to it). fp32 goes to `recursa.kernels.linear_f32` at every row count,
over a panel-ordered copy (at one row a prefetched GEMV, level with MKL's; 1.3-1.9x F.linear at
4-64 rows, level with MKL's packed GEMM past 128); without the kernels
it takes MKL's packed GEMM (`torch.ops.mkl._mkl_linear`). So a projection holds its plain weight
and one packed copy (bf16 with AMX: two). Inside torch.compile the custom ops stay
(`recursa::linear_f32`, `recursa::linear_amx`, `recursa::linear_bf16`) and the rest take F.linear
(inductor cannot trace MKL's or oneDNN's ops).

`CPULinear` is an nn.Linear (same weight, same contract); `use_cpu_kernels_(model)` swaps every
fp32/bf16 projection of the Blocks, and gives a tied model an LM head that shares the embedding's
weight, in place; without the kernels (no AVX512-BF16, no compiler, RECURSA_KERNELS=0) bf16
projections stay as they are, and without MKL fp32 ones do. Results match F.linear to rounding
(another summation order), not bit for bit (tests/model/test_cpu_linear.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recursa import kernels

PACK_ROWS = 32   # the batch size MKL's packing is tuned for


class CPULinear(nn.Linear):
    @classmethod
    def of(cls, weight: nn.Parameter, bias: nn.Parameter | None = None) -> "CPULinear":
        """A CPULinear holding (not copying) `weight` [out, in] and `bias`, plus a packed copy for large inputs."""
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight, layer.bias = weight, bias
        w = weight.detach()
        f32 = kernels.pack_f32(w) if kernels.supports_f32(w) else None
        layer.register_buffer("f32_packed", f32, persistent=False)
        if f32 is not None:
            packed = None
        elif w.dtype == torch.float32 and torch._C.has_mkl:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS)
        elif w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        else:
            packed = None
        layer.register_buffer("packed", packed, persistent=False)
        amx = kernels.pack_amx(w) if kernels.supports(w) and kernels.amx_available() else None
        layer.register_buffer("amx_packed", amx, persistent=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        if self.f32_packed is not None:
            y = (kernels.linear_f32_op if torch.compiler.is_compiling() else kernels.linear_f32)(
                x, self.f32_packed, self.out_features)
            return y if self.bias is None else y + self.bias
        if self.amx_packed is not None and x.numel() <= kernels.AMX_MAX_ROWS * x.shape[-1]:
            amx = kernels.linear_amx_op if torch.compiler.is_compiling() else kernels.linear_amx
            y = amx(x, self.amx_packed, self.out_features)
            return y if self.bias is None else y + self.bias
        if x.numel() <= kernels.MAX_ROWS * x.shape[-1]:
            if x.dtype != torch.bfloat16:
                return F.linear(x, self.weight, self.bias)
            y = (kernels.linear_bf16_op if torch.compiler.is_compiling() else kernels.linear_bf16)(x, self.weight)
            return y if self.bias is None else y + self.bias
        if self.packed is None or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        if x.dtype == torch.float32:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, PACK_ROWS)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _fits(w: torch.Tensor) -> bool:
    if w.device.type != "cpu" or w.dim() != 2:
        return False
    return kernels.supports(w) if w.dtype == torch.bfloat16 else w.dtype == torch.float32


def _swap_linears(root: nn.Module, fits) -> int:
    """Replace every plain nn.Linear under root whose weight `fits` by a CPULinear; how many."""
    swapped = 0
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and fits(child.weight):
                setattr(module, name, CPULinear.of(child.weight, child.bias))
                swapped += 1
    return swapped


def use_cpu_kernels_(model) -> int:
    """Route `model`'s projections (and a tied LM head) through CPULinear; returns how many."""
    swapped = _swap_linears(model.layers, _fits)
    if model.router is not None:   # MoR routers' scorers in bf16 (oneDNN's small-matmul setup costs ~4x the
        # AMX tile call; in fp32 F.linear is already faster than the packed kernel at one output)
        swapped += _swap_linears(model.router, lambda w: w.dtype == torch.bfloat16 and _fits(w))
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    if (model.lm_head is None or type(model.lm_head) is nn.Linear) and _fits(head):
        model.lm_head = CPULinear.of(head, None if model.lm_head is None else model.lm_head.bias)
        swapped += 1
    return swapped
