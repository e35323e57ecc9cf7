"""The matmul kernels' Python side: weight layouts for the AMX tiles and the calls (see recursa.kernels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recursa.kernels import build
from recursa.kernels.build import available

MAX_ROWS = 4   # rows (tokens) up to which the GEMV beats oneDNN; more rows go to F.linear
F32_PANEL = 32   # output columns per panel of pack_f32 (PW in linear_f32.c)
AMX_MAX_ROWS = 128   # bf16 rows up to which AMX tiles are level with or beat oneDNN's packed GEMM (benchmarks/cpu_kernels.py: 16.4 vs 20.7 ms at 32 rows, 22.4 vs 23.0 at 64, 35.8 vs 34.3 at 128)


def _tile_scales(scale: torch.Tensor, minimum: torch.Tensor, blocks: int, pad: int) -> torch.Tensor:
    """scale, minimum [N, K/32] -> [N/32, K/32, 2 tiles, (scale, minimum), 16 columns] bf16."""
    k_blocks = scale.shape[1]
    sm = torch.stack([F.pad(t.float(), (0, 0, 0, pad)).view(blocks, 2, 16, k_blocks).permute(0, 3, 1, 2)
                      for t in (scale, minimum)], dim=3)
    return sm.to(torch.bfloat16).contiguous()


def _tile_rows(q: torch.Tensor, blocks: int, pad: int) -> torch.Tensor:
    """q [N, K] -> [N/32, K/32, 2 tiles, 16 k-pairs, 32]: a tile row holds its 16 columns' k-pair."""
    k = q.shape[1]
    q = F.pad(q, (0, 0, 0, pad))
    return q.view(blocks, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).reshape(blocks, k // 32, 2, 16, 32)


def pack_amx_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 weights w = scale * q + minimum (q [N, K] in 0..15, scale and minimum [N, K/32]) laid out
    as linear_amx_int(..., bits=4) reads them: (tile rows [N/32, K/32, 2, 16, 16] uint8, two
    elements a byte, and the tiles' scales and minimums), N padded to a multiple of 32 with zeros."""
    blocks, pad = -(-q.shape[0] // 32), -q.shape[0] % 32
    rows = _tile_rows(q.to(torch.uint8), blocks, pad)
    return (rows[..., :16] | (rows[..., 16:] << 4)).contiguous(), _tile_scales(scale, minimum, blocks, pad)


def pack_amx_int8(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights w = scales[n] * q[n, k] (q [N, K] int8) as linear_amx_int(..., bits=8) reads them."""
    n, k = q.shape
    blocks, pad = -(-n // 32), -n % 32
    scale = scales.float()[:, None].expand(n, k // 32)
    rows = _tile_rows(q.to(torch.int8), blocks, pad).contiguous().view(torch.uint8)
    return rows, _tile_scales(scale, torch.zeros_like(scale), blocks, pad)


def linear_int4(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """x [..., K] bf16 @ W.T -> [..., n] bf16 for a few rows (<= MAX_ROWS), W in torch's CPU int4 layout
    (Int4Linear.weight, uint8 [N', K/2]) with its scales_and_zeros sz bf16 [K/group, N', 2] (the caller
    checked `available()`). Eager: a direct call; compiled graphs call `linear_int4_op`."""
    build._load()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    build._state["linear_int4"](x2.data_ptr(), w.data_ptr(), sz.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1],
                                n, group, torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def linear_amx_int(x: torch.Tensor, wq: torch.Tensor, sm: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """x [..., K] bf16 @ w.T -> [..., n] bf16 with w given as pack_amx_int4 (bits 4) or pack_amx_int8 (8)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    build._state["linear_amx_int"](x2.data_ptr(), wq.data_ptr(), sm.data_ptr(), y.data_ptr(), x2.shape[0],
                             x2.shape[1], n, bits, torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def supports(w: torch.Tensor) -> bool:
    """Whether linear_bf16 can take weight w: [N, K] bf16 on the CPU, contiguous, K a multiple of 32."""
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous()
            and w.shape[1] % 32 == 0 and build.has("linear_bf16"))


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 @ w[N, K].T -> [..., N] bf16 (the caller checked `supports(w)`). Eager: a
    direct call (~10 us less than through the dispatcher); compiled graphs call `linear_bf16_op`."""
    build._load()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.bfloat16)
    build._state["linear_bf16"](x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1],
                                      w.shape[0], torch.get_num_threads())
    return y.view(*x.shape[:-1], w.shape[0])


def supports_f32(w: torch.Tensor) -> bool:
    """Whether linear_f32 can take weight w: [N, K] fp32 on the CPU (any N and K)."""
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and available()


def pack_f32(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] fp32 laid out as linear_f32 reads it: per panel of 32 output columns (N padded to a
    multiple of 32 with zeros), K rows of the panel's 32 weights, contiguous."""
    n, k = w.shape
    panels = -(-n // F32_PANEL)
    padded = torch.zeros(panels * F32_PANEL, k, dtype=torch.float32)
    padded[:n] = w
    return padded.view(panels, F32_PANEL, k).transpose(1, 2).contiguous()


def linear_f32(x: torch.Tensor, wp: torch.Tensor, n: int) -> torch.Tensor:
    """x [..., K] fp32 @ w.T -> [..., n] fp32, w given as pack_f32(w) (the caller checked
    `available()`). Eager: a direct call; compiled graphs call `linear_f32_op`."""
    if x.shape[-1] == 0:   # an empty sum: the kernel would leave y unwritten
        return x.new_zeros(*x.shape[:-1], n)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    build._state["linear_f32"](x2.data_ptr(), wp.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1], n,
                               torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def pack_amx(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] bf16 laid out as linear_amx reads it: per block of 32 output columns (N padded to a
    multiple of 32 with zeros) and of 32 k, two 16 x 16 tiles of k-pairs, contiguous."""
    n, k = w.shape
    blocks = -(-n // 32)
    padded = torch.zeros(blocks * 32, k, dtype=torch.bfloat16)
    padded[:n] = w
    return padded.view(blocks, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


def linear_amx(x: torch.Tensor, wp: torch.Tensor, n: int) -> torch.Tensor:
    """x [..., K] bf16 @ w.T -> [..., n] bf16, w given as pack_amx(w) (the caller checked
    `amx_available()` and `supports(w)`). Eager: a direct call; compiled graphs call `linear_amx_op`."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    build._state["linear_amx"](x2.data_ptr(), wp.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1], n,
                         torch.get_num_threads())
    return y.view(*x.shape[:-1], n)
