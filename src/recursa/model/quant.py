"""Reduced-precision weights for inference: bf16, and weight-only int8 / int4 linear layers.

At batch 1 a decoder step reads every weight once, so the bytes per weight set the speed.
`prepare(model, dtype, quantization)` turns a loaded Decoder into an inference model:

- dtype "bfloat16" | "float32": the compute dtype of activations, embeddings, norms' gains,
  adapters and KV cache (RMSNorm still normalises in fp32; RoPE frequencies stay fp32).
- quantization None | "int8" | "int4": every projection of every Block becomes
  - `Int8Linear`: symmetric int8 per output channel, w = s[n] * q[n, k], q in [-127, 127];
    CPU kernel `torch._weight_int8pack_mm`, or with AMX `recursa.kernels.linear_amx_int` at any
    token count (1.4x at batch 1 and 10-20x at 32 tokens on SmolLM2's head, 1 thread);
  - `Int4Linear`: affine int4 in groups of `group_size` inputs (32 by default, like GGUF's
    Q4_1), w = scale * q + minimum, q in [0, 15]; CPU kernel `torch._weight_int4pack_mm_for_cpu`.
  Elsewhere (CUDA) both dequantize to the compute dtype and run F.linear: slower, never wrong.
  The LM head (the tied embedding's matmul) stays in the compute dtype by default: in int4 it
  costs SmolLM2 +5.7% perplexity (its rms weight error is 9% of the weights', 0.2% for the
  projections), and at its shape (49k x 576) the int8 kernel is slower than bf16 at batch 1 and
  6x slower at batch 32, int4 3x slower at batch 32 (benchmarks/RESULTS.md). `head="int8"` or
  `"int4"` quantizes it anyway (the embedding lookup keeps the compute dtype either way).
- q/k/v and gate/up are fused first (Block.fuse), so each becomes one (quantized) matmul, fp32
  included (re-measured 2026-12-02, 1 thread, all 30 layers' matrices: fused 3-5% faster at
  batch 1 and at 32 tokens; an earlier run had found fused fp32 matmuls
  slower at batch 1 in two of three runs, benchmarks/RESULTS.md).

Both modules keep nn.Linear's contract (x [..., in] -> [..., out]), so LoRA adapters of
relaxed recursive models still add on top. Quantize from fp32 weights: the scales are computed
in fp32, then stored in bf16: the CPU kernels are fast only with bf16 activations and scales, so
other activations are cast to bf16 around the kernel (dtype "float32" + a quantization is
allowed, and slower: the rest of the model then runs in fp32).

The int4 CPU kernel's weight layout (torch 2.13, read back in tests/model/test_quant.py):
`_convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)` -> uint8 [N, K/2] holding blocks of
64 output rows; in block b, byte (k, j) has row 64b+j in its low nibble and row 64b+j+32 in its
high one. The matching scales_and_zeros is [K/group, N, 2] with (scale, zero) where the kernel
computes w = (q - 8) * scale + zero, i.e. zero = minimum + 8 * scale. N is padded to a multiple
of 64 so that layout holds for every row (the padded rows' outputs are cut off).

    from recursa.model.quant import prepare
    model = prepare(recursa.load("models/smollm2-135m"), dtype="bfloat16", quantization="int4")
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from recursa import kernels
from recursa.errors import RecursaError
from recursa.model.cpu_linear import use_cpu_kernels_
from recursa.model.int4_weights import load_int4_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("int8", "int4")
# The CPU int8/int4 kernels are vectorised for bf16 activations only (fp32 inputs run ~10x slower,
# measured in benchmarks/precision.py): scales are kept in bf16 and other inputs are cast to it.
KERNEL_DTYPE = torch.bfloat16
INT4_BLOCK_N = 64  # output rows per block of the CPU int4 layout


def resolve_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from "bfloat16" | "float32" | torch.bfloat16 | torch.float32 | None."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise RecursaError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


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


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N', K/2] -> q uint8 [n, K] (see the module docstring)."""
    Np, K2 = packed.shape
    half = INT4_BLOCK_N // 2
    v = packed.reshape(Np // INT4_BLOCK_N, 2 * K2, half)           # [block, k, j]
    q = torch.cat((v & 15, v >> 4), dim=-1)                          # [block, k, 64]
    return q.transpose(1, 2).reshape(Np, 2 * K2)[:n]


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
        elif x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(_as(x2, KERNEL_DTYPE), self.weight, self.group_size,
                                                  _as(self.scales_and_zeros, KERNEL_DTYPE))
            y = _as(y if y.shape[-1] == self.out_features else y[:, :self.out_features], x.dtype)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


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
