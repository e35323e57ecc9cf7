"""Reduced-precision weights for inference: bf16, and weight-only int8 / int4 linear layers.

At batch 1 a decoder step reads every weight once, so the bytes per weight set the speed.
`prepare(model, dtype, quantization)` turns a loaded Decoder into an inference model:

- dtype "bfloat16" | "float32": the compute dtype of activations, embeddings, norms' gains,
  adapters and KV cache (RMSNorm still normalises in fp32; RoPE frequencies stay fp32).
- quantization None | "int8" | "int4": every projection of every Block becomes an `Int8Linear`
  (symmetric, per output channel) or an `Int4Linear` (affine, groups of 32 like GGUF's Q4_1),
  with their CPU kernels (recursa.model.quant_linear).
  The LM head (the tied embedding's matmul) stays in the compute dtype by default: in int4 it
  costs SmolLM2 +5.7% perplexity (its rms weight error is 9% of the weights', 0.2% for the
  projections), int8 +0.09%. `head="int8"` or `"int4"` quantizes it (the embedding lookup keeps
  the compute dtype either way); without AMX, torch's int8 kernel is slower than bf16 at the
  head's shape (49k x 576), 6x at batch 32 (benchmarks/RESULTS.md).
- q/k/v and gate/up are fused first (Block.fuse), so each becomes one (quantized) matmul, fp32
  included (re-measured 2026-12-02, 1 thread, all 30 layers' matrices: fused 3-5% faster at
  batch 1 and at 32 tokens; an earlier run had found fused fp32 matmuls
  slower at batch 1 in two of three runs, benchmarks/RESULTS.md).

Both modules keep nn.Linear's contract (x [..., in] -> [..., out]), so LoRA adapters of
relaxed recursive models still add on top. Quantize from fp32 weights: the scales are computed
in fp32, then stored in bf16: the CPU kernels are fast only with bf16 activations and scales, so
other activations are cast to bf16 around the kernel (dtype "float32" + a quantization is
allowed, and slower: the rest of the model then runs in fp32).

    from recursa.model.quant import prepare
    model = prepare(recursa.load("models/smollm2-135m"), dtype="bfloat16", quantization="int4")
"""
from __future__ import annotations

import os

import torch
from torch import nn

from recursa.errors import RecursaError
from recursa.model.cpu_linear import use_cpu_kernels_
from recursa.model.int4_weights import load_int4_weights
from recursa.model.quant_linear import (KERNEL_DTYPE, Int4Linear, Int8Linear, int4_affine, pack_int4,
                                        unpack_int4)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("int8", "int4")
def resolve_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from "bfloat16" | "float32" | torch.bfloat16 | torch.float32 | None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise RecursaError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def quantized_linear(weight: torch.Tensor, quantization: str, group_size: int = 32):
    """The quantized module for an fp weight [out, in]."""
    if quantization == "int8":
        return Int8Linear.from_float(weight)
    if quantization == "int4":
        return Int4Linear.from_float(weight, group_size)
    raise RecursaError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")


def _block_linears(model):
    """(parent module, attribute name) of every nn.Linear projection inside the Blocks."""
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name


@torch.no_grad()
def quantize_(model, quantization: str, group_size: int = 32, head: bool | str = False,
              int4_weights: dict | None = None):
    """Replace (in place) the Blocks' projections, and with `head` the LM head, by quantized modules.

    head: False (the LM head keeps the compute dtype), "int8" / "int4", or True (the projections' format).

    int4_weights: optional {"layers.3.attn.q_proj.weight": (q [N, K], scale, minimum)} of int4
    blocks to use as they are instead of quantizing the float weight (recursa.convert.q4:
    SmolLM2's Q4_1 GGUF blocks); a fused projection takes its parts' blocks concatenated.
    """
    given = int4_weights or {}
    names = {id(m): n for n, m in model.named_modules()}
    for parent, name in _block_linears(model):
        linear = getattr(parent, name)
        prefix = names[id(parent)]
        parts = _FUSED_PARTS.get(name, (name,))
        keys = [f"{prefix}.{p}.weight" for p in parts]
        if quantization == "int4" and all(k in given for k in keys):
            q, scale, minimum = (torch.cat([given[k][i] for k in keys]) for i in range(3))
            if q.shape != linear.weight.shape or linear.in_features // scale.shape[1] != group_size:
                raise RecursaError(f"int4 blocks for {keys[0]} do not fit its weight {tuple(linear.weight.shape)}")
            module = Int4Linear(q, scale, minimum, group_size)
        else:
            module = quantized_linear(linear.weight, quantization, group_size)
        setattr(parent, name, module.to(linear.weight.device))
    if head:
        head_format = quantization if head is True else head
        weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        key = "embed_tokens.weight" if model.lm_head is None else "lm_head.weight"
        if head_format == "int4" and key in given:
            module = Int4Linear(*given[key], group_size)
        else:
            module = quantized_linear(weight, head_format, group_size)
        model.lm_head = module.to(weight.device)  # a tied model keeps its embedding for the lookup
    return model


_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_(model):
    """Fused q/k/v and gate/up in every Block (in place; inference only, see layers.py)."""
    for block in model.layers:
        block.fuse()
    return model


@torch.no_grad()
def prepare(model, dtype=None, quantization: str | None = None, group_size: int = 32, fuse: bool = True,
            head: bool | str = False, int4_weights=None):
    """An inference model (in place, returned): fused projections, the compute dtype, quantized weights.

    dtype None keeps the model's own, or bf16 with a quantization (what the CPU kernels want);
    quantization None | "int8" | "int4" (see the module docstring). int4_weights: int4 blocks to
    use as they are (see quantize_), or a model directory whose int4.safetensors holds them (if any).
    fuse: q/k/v and gate/up as one matmul each (False keeps the separate projections).
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise RecursaError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    dtype = resolve_dtype(dtype) or (KERNEL_DTYPE if quantization else model.embed_tokens.weight.dtype)
    if fuse:
        fuse_(model)
    if isinstance(int4_weights, (str, os.PathLike)):
        int4_weights = load_int4_weights(int4_weights) if quantization == "int4" else None
    if quantization is not None:  # from the float weights as loaded (fp32): scales computed in fp32
        quantize_(model, quantization, group_size, head=head, int4_weights=int4_weights)
    inv_freq = model.inv_freq
    model.to(dtype)  # float tensors only: int8/uint8 weights keep their type
    model.inv_freq = inv_freq
    for module in model.modules():  # scales stay in the kernels' dtype (.to() is a no-op in forward then)
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.to(KERNEL_DTYPE)
    use_cpu_kernels_(model)   # fp32/bf16 projections and LM head: the fastest CPU matmul per token count
    return model.eval().requires_grad_(False)


def weight_bytes(model) -> int:
    """Bytes of every weight read per decode step: the Blocks' projections and the LM head."""
    total = 0
    for module in list(model.layers.modules()) + ([model.lm_head] if model.lm_head is not None else []):
        if isinstance(module, (nn.Linear, Int8Linear, Int4Linear)):
            total += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if model.lm_head is None:
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


__all__ = ["DTYPES", "QUANTIZATIONS", "Int8Linear", "Int4Linear", "int4_affine", "pack_int4", "unpack_int4",
           "quantized_linear", "quantize_", "fuse_", "prepare", "resolve_dtype", "weight_bytes"]
