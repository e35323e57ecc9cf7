"""bf16 projections that run decode-sized matmuls through recursa's own CPU kernel.

`BF16Linear` is an nn.Linear (same weight, same contract) whose forward sends inputs of at most
`kernels.MAX_ROWS` tokens to `recursa.kernels.linear_bf16` (AVX512-BF16 GEMV, about twice
oneDNN's speed at batch 1 on this project's CPU) and everything larger (prefill, big batches) to
F.linear. `use_bf16_kernel_(model)` swaps every bf16 projection of the Blocks, and gives a tied
model an LM head that shares the embedding's weight, in place; where the kernel is unavailable
(no AVX512-BF16, no compiler, RECURSA_KERNELS=0) it changes nothing. The kernel rounds once from
its fp32 accumulator, like oneDNN; sums come in another order, so results match F.linear to
bf16 rounding, not bit for bit (tests/model/test_bf16_linear.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recursa import kernels


class BF16Linear(nn.Linear):
    @classmethod
    def of(cls, weight: nn.Parameter, bias: nn.Parameter | None = None) -> "BF16Linear":
        """A BF16Linear holding (not copying) `weight` [out, in] and `bias`."""
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight, layer.bias = weight, bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > kernels.MAX_ROWS * x.shape[-1] or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        kernel = kernels.linear_bf16_op if torch.compiler.is_compiling() else kernels.linear_bf16
        y = kernel(x, self.weight)
        return y if self.bias is None else y + self.bias


def use_bf16_kernel_(model) -> int:
    """Route `model`'s bf16 projections (and a tied LM head) through BF16Linear; returns how many."""
    swapped = 0
    for module in list(model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and kernels.supports(child.weight):
                setattr(module, name, BF16Linear.of(child.weight, child.bias))
                swapped += 1
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    if (model.lm_head is None or type(model.lm_head) is nn.Linear) and kernels.supports(head):
        model.lm_head = BF16Linear.of(head, None if model.lm_head is None else model.lm_head.bias)
        swapped += 1
    return swapped
