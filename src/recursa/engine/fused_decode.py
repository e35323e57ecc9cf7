"""A decode span in one C call (recursa.kernels' `decode_span`), where every layer of it allows.

"Decode" here is any span whose attention reads the cache in place: one token per request, or a
short chunk per request (speculative verification, parallel decoding's catch-up, small prefill
chunks; see engine/attention.py's IN_PLACE_CHUNK and IN_PLACE_WORK).

An eager decode layer is about a dozen kernel calls (norm, q/k/v matmul, rope, KV write,
attention, o matmul, residual add, norm, gate/up matmul, activation, down matmul, add), each
wrapped in Python that checks, allocates and dispatches; at 30 layers and 32 tokens that glue was
about a fifth of a step on this CPU, and torch.compile's graph keeps much of it (custom-op calls,
guards). `FusedDecode` hands the same kernels the whole span at once: same kernels, same order,
same roundings, so the hidden states and the cache come out with the same bits as the eager layer
(tests/engine/test_fused_decode.py).

It runs a span when its tokens attend in place (`PagedBatch.in_place`): over a dense cache
(requests at different loops of a shared block read per-depth slot tables, shifted per request)
or over recursion-wise caching's compact tables, at any mix of depths; each layer is a plain
fused `Block` (no LoRA adapters, its own keys/values) whose projections at this many rows take one of the C matmuls (bf16 AMX tiles or GEMV, int8/int4 AMX
tiles, the int4 GEMV, the packed fp32 GEMM/GEMV). Anything else (bf16 past 128 rows, which
oneDNN serves) keeps the layer-by-layer path. RECURSA_FUSED_DECODE=0 turns
it off.
"""
from __future__ import annotations

import ctypes
import os

import torch

from recursa import kernels
from recursa.kernels import build
from recursa.model.cpu_linear import CPULinear
from recursa.model.layers import Block
from recursa.model.quant_linear import Int4Linear, Int8Linear

_FUNCTIONS = ("rms_norm", "silu_mul", "rope_qk", "kv_write", "paged_decode_attention", "linear_amx", "linear_amx_int",
              "linear_f32", "linear_bf16", "linear_int4")   # the order of decode_span.c's enum K
_AMX, _AMX_INT, _F32, _BF16, _INT4 = 1, 2, 3, 4, 5
_LAYER_WORDS = 24


def _projection(proj, rows: int, dtype: torch.dtype) -> list[int] | None:
    """decode_span's words for `proj` at `rows` tokens — the kernel its forward would call — or None."""
    if isinstance(proj, CPULinear) and proj.bias is None and proj.weight.dtype == dtype:
        if proj.f32_packed is not None:
            return [_F32, proj.f32_packed.data_ptr(), 0, proj.out_features, 0]
        if proj.amx_packed is not None and rows <= kernels.AMX_MAX_ROWS:
            return [_AMX, proj.amx_packed.data_ptr(), 0, proj.out_features, 0]
        if dtype == torch.bfloat16 and rows <= kernels.MAX_ROWS and kernels.supports(proj.weight):
            return [_BF16, proj.weight.data_ptr(), 0, proj.out_features, 0]
        return None
    if (dtype == torch.bfloat16 and isinstance(proj, Int4Linear) and rows <= kernels.MAX_ROWS
            and build.has("linear_int4")):
        return [_INT4, proj.weight.data_ptr(), proj.scales_and_zeros.data_ptr(), proj.out_features, proj.group_size]
    if dtype == torch.bfloat16 and isinstance(proj, (Int8Linear, Int4Linear)) and proj.amx_q is not None:
        return [_AMX_INT, proj.amx_q.data_ptr(), proj.amx_sm.data_ptr(), proj.out_features,
                8 if isinstance(proj, Int8Linear) else 4]
    return None


class FusedDecode:
    """Plans (per span start, length and row count) and runs decode spans through decode_span."""

    def __init__(self, model, kv, dtype: torch.dtype):
        cfg = model.cfg
        self.model, self.kv, self.dtype = model, kv, dtype
        self.enabled = (os.environ.get("RECURSA_FUSED_DECODE", "1") != "0" and kv.k.device.type == "cpu"
                        and dtype in (torch.bfloat16, torch.float32) and kernels.available()
                        and cfg.dim % 16 == 0 and cfg.head_dim % 32 == 0 and cfg.ffn_dim % 16 == 0
                        and kernels.supports_attention(cfg.n_heads, kv.k, dtype))
        # tables of raw weight pointers, built lazily: the engine never changes its model's weights
        # after preparing it; the tensors they point to stay referenced (the model holds them)
        self._plans: dict[tuple[int, int, int], torch.Tensor | None] = {}
        self._fn = None

    def _layer(self, depth: int, rows: int) -> list[int] | None:
        m = self.model
        block = m.stage(depth)
        if (type(block) is not Block or m.adapters(depth) is not None or m.kv_source(depth) != depth
                or block.attn.qkv_proj is None or block.mlp.gate_up_proj is None
                or block.attn_norm.weight.dtype != self.dtype or block.mlp_norm.weight.dtype != self.dtype):
            return None
        projs = [_projection(p, rows, self.dtype) for p in
                 (block.attn.qkv_proj, block.attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj)]
        if any(p is None for p in projs):
            return None
        words = [block.attn_norm.weight.data_ptr(), block.mlp_norm.weight.data_ptr(),
                 self.kv.offset(m.kv_source(depth))] + [w for p in projs for w in p]
        return words + [0] * (_LAYER_WORDS - len(words))

    def plan(self, first: int, n: int, rows: int) -> torch.Tensor | None:
        """The layer table [n, 24] of depths first .. first + n - 1 at `rows` tokens, or None."""
        key = (first, n, rows)
        if key not in self._plans:
            layers = [self._layer(d, rows) for d in range(first, first + n)]
            self._plans[key] = None if any(w is None for w in layers) else torch.tensor(layers, dtype=torch.int64)
        return self._plans[key]

    def _functions(self):
        if self._fn is None:
            kernels.amx_available()   # loads linear_amx where the CPU has it
            self._fn = (ctypes.c_void_p * len(_FUNCTIONS))(
                *[ctypes.cast(build._state[f], ctypes.c_void_p).value if f in build._state else None
                  for f in _FUNCTIONS])
        return self._fn

    def run(self, batch, x: torch.Tensor, first: int, offsets: list[list[int]],
            capture: tuple[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """x [1, M, D] (M tokens) after the span's depths first .. first + len(offsets) - 1 (a new tensor), or None
        where it cannot run. offsets[j]: the slot offset of depth first + j's cache layer, one for
        all requests or one per request (requests at different loops of a shared block).
        capture (j, out): out [1, M, D] receives the hidden states after depth first + j."""
        if not (self.enabled and batch.in_place and x.dtype == self.dtype):
            return None
        rows, n = x.shape[1], len(offsets)
        table = self.plan(first, n, rows)
        if table is None:
            return None
        cfg, kv = self.model.cfg, self.kv
        x = x.contiguous().clone()
        slots, new_slots, index, slot_stride, new_stride = self._slots(batch, offsets)
        cos, sin, lens = batch.cos.contiguous(), batch.sin.contiguous(), batch.lens.contiguous()
        status = build._state["decode_span"](
            self._functions(), table.data_ptr(), n, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), kv.k.data_ptr(),
            kv.v.data_ptr(), kv.k.shape[0], slots.data_ptr(), slots.shape[-1], new_slots.data_ptr(),
            None if index is None else index.data_ptr(), slot_stride, new_stride, lens.data_ptr(),
            None if batch.rows is None else batch.rows.data_ptr(), rows, cfg.dim, cfg.n_heads, cfg.n_kv_heads,
            cfg.head_dim, cfg.ffn_dim, cfg.norm_eps, cfg.head_dim ** -0.5,
            int(self.dtype == torch.bfloat16), torch.get_num_threads(),
            None if capture is None else capture[1].data_ptr(), -1 if capture is None else capture[0])
        if status < 0:
            raise MemoryError("decode_span: no memory for its scratch buffers")
        if status:
            depth = first + status // 10
            if status % 10 == 1:   # as kv_write raises on the eager path
                raise IndexError(f"decode_span: a cache slot is out of range at depth {depth}")
            raise RuntimeError(f"decode_span: attention failed at depth {depth}")
        kv.entries_written += n * rows
        return x

    @staticmethod
    def _slots(batch, offsets: list[list[int]]):
        """(slots, new slots, table index per layer or None, strides) as decode_span reads them."""
        if batch.per_layer:   # recursion-wise caching: layer j's tables are slots[offsets[j][0]]
            slots, new = batch.slots.contiguous(), batch.new_slots.contiguous()
            index = torch.tensor([o[0] for o in offsets], dtype=torch.int64)
            return slots, new, index, slots[0].numel(), new.shape[-1]
        if any(len(o) > 1 for o in offsets):   # dense, requests at different loops: each depth's own tables
            pairs = [batch.shifted(o) for o in offsets]
            slots, new = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            return slots, new, torch.arange(len(offsets)), slots[0].numel(), new.shape[-1]
        return batch.slots.contiguous(), batch.new_slots.contiguous(), None, 0, 0   # + each layer's offset
