"""The non-matmul kernels' Python side: elementwise passes, the KV write, greedy row maxima and
paged decode attention (see recursa.kernels)."""
from __future__ import annotations

import torch

from recursa.kernels import build
from recursa.kernels.build import available


def supports_elementwise(x: torch.Tensor, size: int | None = None) -> bool:
    """Whether rms_norm / silu_mul take x: bf16 or fp32 on the CPU, the size they run over (x's
    last by default; silu_mul: ffn) a multiple of 16, in eager inference (no autograd: they have no
    backward; compiled graphs fuse these ops themselves)."""
    return (x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu" and (size or x.shape[-1]) % 16 == 0
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim (weight in x's dtype): bf16 as F.rms_norm then a bf16
    multiply round it; fp32 as F.rms_norm with the gain, to rounding."""
    x = x.contiguous()
    y = torch.empty_like(x)
    build._state["rms_norm"](x.data_ptr(), None if weight is None else weight.data_ptr(), y.data_ptr(),
                             x.numel() // x.shape[-1], x.shape[-1], eps, int(x.dtype == torch.bfloat16),
                             torch.get_num_threads())
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2 * ffn] = (gate, up), as F.silu then a multiply (bf16: the
    same roundings; fp32: to rounding)."""
    gate_up = gate_up.contiguous()
    ffn = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], ffn)
    build._state["silu_mul"](gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * ffn), ffn,
                             int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def supports_rope(qkv: torch.Tensor, cos: torch.Tensor, head_dim: int) -> bool:
    """Whether rope_qk takes this fused projection: one packed row [1, N, heads * hd] on the CPU in
    fp32 or bf16 (cos alike, one row per token), hd a multiple of 32, eager inference."""
    return (qkv.dim() == 3 and qkv.shape[0] == 1 and qkv.dtype in (torch.float32, torch.bfloat16)
            and qkv.device.type == "cpu" and cos.dtype == qkv.dtype and head_dim % 32 == 0
            and cos.numel() == qkv.shape[1] * head_dim and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and available())


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The first `heads` heads of qkv [1, N, heads_total * hd] rotated: [1, heads, N, hd], as
    x * cos + rotate_half(x) * sin in PyTorch (same roundings; fp32: the same bits)."""
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    n = qkv.shape[1]
    out = qkv.new_empty(1, heads, n, head_dim)
    build._state["rope_qk"](qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), n,
                      qkv.shape[2] // head_dim, heads, head_dim, int(qkv.dtype == torch.bfloat16),
                      torch.get_num_threads())
    return out


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> bool:
    """k_cache[slots] = k and v_cache[slots] = v (k, v [n, Hkv, hd] at any strides with contiguous
    heads; caches contiguous, of k's dtype) in one call, as index_copy_ does in two. Returns False,
    writing nothing, where it cannot run (the caller then uses index_copy_)."""
    if (k.device.type != "cpu" or k.dtype != k_cache.dtype or v.dtype != v_cache.dtype or k.dtype != v.dtype
            or k.stride(-1) != 1 or v.stride(-1) != 1 or slots.dtype != torch.int64 or not slots.is_contiguous()
            or not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape)
            or torch.compiler.is_compiling() or not available()):
        return False
    status = build._state["kv_write"](k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], slots.data_ptr(),
                                k.data_ptr(), v.data_ptr(), k.shape[0], k.shape[1], k.shape[2], k.stride(0),
                                k.stride(1), v.stride(0), v.stride(1), k.element_size())
    if status:
        raise IndexError("kv_write: a cache slot is out of range")
    return True


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(maximum fp32 [rows], first index int64 [rows]) of each row of x [rows, n] (fp32 or bf16, CPU),
    as x.max(dim=-1) (NaN rows: NaN); ~20x faster on a 49k-entry vocabulary. None if it cannot run."""
    if x.dim() != 2 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or not available():
        return None
    x = x.contiguous()
    best = torch.empty(x.shape[0], dtype=torch.float32)
    index = torch.empty(x.shape[0], dtype=torch.int64)
    build._state["row_max"](x.data_ptr(), best.data_ptr(), index.data_ptr(), x.shape[0], x.shape[1],
                      int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return best, index


def supports_attention(n_heads: int, k_cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether paged_decode_attention takes queries of `dtype` with n_heads heads over k_cache: CPU,
    fp32 or bf16 (the cache's), head size a multiple of 16 (<= 256), <= 16 query heads per kv head."""
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    return (k_cache.device.type == "cpu" and k_cache.dtype in (torch.float32, torch.bfloat16) and dtype == k_cache.dtype
            and hd % 16 == 0 and hd <= 256 and n_heads % n_kv == 0 and n_heads // n_kv <= 16 and available())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                           offset: int, lens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q K^T / sqrt(hd)) V for each query over its request's cached positions, read in place.

    q [B, H, hd]; k_cache, v_cache [slots, Hkv, hd] (q's dtype); slots [R, Smax] int64: the slot of
    each position at cache layer 0, `offset` added for the depth's layer; lens [B] int64: query b
    sees positions 0 .. lens[b] - 1 of slot row rows[b] (rows None: row b, one query per request;
    several queries of a request: a short chunk whose keys were written first). Returns [B, H, hd].
    The caller checked `supports_attention`."""
    build._load()
    q, slots, lens = q.contiguous(), slots.contiguous(), lens.contiguous()   # the C reads rows of slots by shape[1]
    rows = None if rows is None else rows.contiguous()
    out = torch.empty_like(q)
    B, H, hd = q.shape
    status = build._state["paged_decode_attention"](q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                                       slots.shape[1], offset, lens.data_ptr(),
                                       None if rows is None else rows.data_ptr(), out.data_ptr(), B, H,
                                       k_cache.shape[1], hd, hd ** -0.5, int(q.dtype == torch.bfloat16),
                                       torch.get_num_threads())
    if status:
        raise RuntimeError(f"paged_decode_attention failed (status {status})")
    return out
