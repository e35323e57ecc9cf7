"""Keep a GGUF's Q4_1 blocks as recursa int4 weights instead of only dequantizing them.

GGUF Q4_1 stores each row in blocks of 32 weights, 20 bytes each: fp16 scale d, fp16 minimum m,
then 16 bytes of 4-bit codes (byte j holds weight j in its low nibble and weight j + 16 in its
high one); w = d * q + m. recursa's affine group-32 int4 (recursa.model.quant.Int4Linear) is the
same form, so the blocks carry over code for code: q unchanged, scale = d, minimum = m (the
kernel's zero point m + 8d and the bf16 scales are the only roundings; `max_error` measures
them). llama.cpp stores q/k rows permuted per head for its RoPE (pairs interleaved); they are put
back into HuggingFace's order, as transformers does when it dequantizes.

    from recursa.convert.q4 import read_q4_1
    blocks = read_q4_1("SmolLM2-135M-Instruct.Q4_1.gguf", model.cfg)    # {recursa weight name: (q, d, m)}
    save_int4_weights(blocks, "models/smollm2-135m")                       # recursa models fetch --keep-int4

Tensors of other types (SmolLM2's Q8_0 embedding, fp32 norms) are not returned: prepare()
quantizes what has no blocks from the float weights.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from recursa.errors import RecursaError

Q4_1_BLOCK, Q4_1_BYTES = 32, 20
_PROJ = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def q4_1_blocks(raw: np.ndarray):
    """Rows of Q4_1 blocks (uint8 [N, K/32 * 20]) -> (q uint8 [N, K], d fp16 [N, K/32], m fp16 [N, K/32])."""
    N = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(N, -1, Q4_1_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    codes = blocks[..., 4:]
    q = torch.cat((codes & 15, codes >> 4), dim=-1)  # [N, K/32, 32]: weights 0..15, then 16..31
    return q.reshape(N, -1), d, m


def _unpermute_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row index i of the HuggingFace weight = row idx[i] of llama.cpp's RoPE-permuted one."""
    hd = n_rows // n_heads
    return torch.arange(n_rows).reshape(n_heads, hd // 2, 2).transpose(1, 2).reshape(-1)


def read_q4_1(path: str | os.PathLike, cfg) -> dict:
    """{recursa weight name: (q, d, m)} for every Q4_1 projection of the GGUF at `path`."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader
    except ImportError:
        raise RecursaError("reading GGUF blocks needs the hf extra (the gguf package): pip install 'recursa[hf]'") from None
    weights = {}
    for t in GGUFReader(str(path)).tensors:
        parts = t.name.split(".")  # blk.<i>.<proj>.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _PROJ:
            continue
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        q, d, m = q4_1_blocks(np.asarray(t.data))
        if parts[2] in ("attn_q", "attn_k"):
            idx = _unpermute_rows(q.shape[0], cfg.n_heads if parts[2] == "attn_q" else cfg.n_kv_heads)
            q, d, m = q[idx], d[idx], m[idx]
        weights[f"layers.{int(parts[1])}.{_PROJ[parts[2]]}.weight"] = (q.contiguous(), d.contiguous(), m.contiguous())
    if not weights:
        raise RecursaError(f"{path} has no Q4_1 projection weights")
    return weights


def dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w = d * q + m in fp32, per group of 32."""
    g = q.shape[1] // d.shape[1]
    return q.float() * d.float().repeat_interleave(g, 1) + m.float().repeat_interleave(g, 1)


@torch.no_grad()
def max_error(model, weights: dict) -> dict:
    """How far the int4 modules built from the blocks are from the model's (dequantized) weights:
    max |w| and max |error| of the exact Q4_1 dequantization, and of the int4 kernel's weights."""
    from recursa.model.quant import Int4Linear

    state = model.state_dict()
    exact = kernel = w_max = 0.0
    for name, (q, d, m) in weights.items():
        w = state[name].float()
        exact = max(exact, (dequantize(q, d, m) - w).abs().max().item())
        kernel = max(kernel, (Int4Linear(q, d, m, q.shape[1] // d.shape[1]).dequantize() - w).abs().max().item())
        w_max = max(w_max, w.abs().max().item())
    return {"tensors": len(weights), "max_abs_weight": w_max, "q4_1_max_abs_err": exact, "int4_max_abs_err": kernel}


__all__ = ["q4_1_blocks", "read_q4_1", "dequantize", "max_error"]
