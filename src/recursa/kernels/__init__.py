"""Hand-written CPU kernels, built from C on first use (a C compiler and OpenMP; no torch headers).

`linear_bf16(x, w)`: the bf16 matmul for a few rows (decode at small batch) through AVX512-BF16
dot products (`vdpbf16ps`, fp32 accumulation), reading each weight row once. PyTorch's bf16
F.linear (oneDNN) runs batch-1 GEMV on this kind of CPU at about half the memory bandwidth, below
even fp32 (benchmarks/RESULTS.md), and at batch 1 the weight read is the whole cost of a layer.

`linear_amx(x, wp, n)`: the bf16 matmul for up to `AMX_MAX_ROWS` rows on AMX tiles (TDPBF16PS,
fp32 accumulation) over a weight packed once by `pack_amx`: decode at any batch size the engine
runs reads the weights at close to memory bandwidth, where oneDNN's packed GEMM reaches about
two thirds of it at 32 rows. Needs a CPU with AMX-BF16 (Sapphire Rapids and later) and Linux's
permission for the tile state; elsewhere `amx_available()` is False and callers keep the GEMV
and oneDNN. RECURSA_AMX=0 turns only this kernel off.

`rms_norm_bf16(x, w, eps)`, `silu_mul_bf16(gate_up)`, `rope_qk(qkv, cos, sin, ...)`: a layer's
norms, its MLP's activation (bf16) and rope on its queries and keys (bf16, fp32) in one pass each,
in eager mode (about a tenth of a step at 32 tokens went to the
five to eight PyTorch ops each of them takes in bf16).

`row_max(logits)`: greedy decoding's maximum and its index per row (torch.max over a 49k
vocabulary costs ~60 us a row on this CPU).

`paged_decode_attention(q, k_cache, v_cache, slots, offset, lens)`: attention of one query per
request over its paged cache, reading keys/values where they lie (fp32 or bf16): no gathered copy
of the context, no padding mask, one call per depth instead of a gather, a mask and SDPA.

Each source (kernels/*.c) compiles once per source hash into ~/.cache/recursa/kernels (override:
RECURSA_KERNEL_CACHE) with `cc -O3 -mavx512f -mavx512bf16 -fopenmp`, written to a temporary file
and renamed; the shared library joins the OpenMP runtime torch already loaded (one thread pool).
`available()` is False, with the reason in `unavailable_reason()`, where the CPU lacks AVX512-BF16,
no compiler is found, or a build fails: callers then keep the PyTorch path (F.linear, SDPA).
RECURSA_KERNELS=0 turns the kernels off. Inside torch.compile the kernels are the opaque custom
ops `recursa::linear_bf16`, `recursa::linear_amx` and `recursa::paged_decode_attention`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

_HERE = Path(__file__).parent
MAX_ROWS = 4   # rows (tokens) up to which the GEMV beats oneDNN; more rows go to F.linear
AMX_MAX_ROWS = 64   # rows up to which the AMX kernel beats oneDNN's packed GEMM (which reuses x better)
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {   # C source -> {function (without its recursa_ prefix): (argument types, return type)}
    "linear_bf16": {"linear_bf16": ([_P] * 3 + [_I64] * 3 + [_I], None)},
    "paged_attention": {"paged_decode_attention": ([_P] * 4 + [_I64] * 2 + [_P] * 2 + [_I64] * 4
                                                   + [ctypes.c_float, _I, _I], _I)},
    "norm_act": {"rms_norm_bf16": ([_P] * 3 + [_I64] * 2 + [ctypes.c_float, _I], None),
                 "silu_mul_bf16": ([_P] * 2 + [_I64] * 2 + [_I], None),
                 "rope_qk": ([_P] * 4 + [_I64] * 4 + [_I, _I], None),
                 "kv_write": ([_P, _P, _I64, _P, _P, _P] + [_I64] * 8, _I)},
    "row_max": {"row_max": ([_P] * 3 + [_I64] * 2 + [_I, _I], None)},
    "linear_amx": {"linear_amx": ([_P] * 3 + [_I64] * 3 + [_I], None),
                   "linear_amx_int": ([_P] * 4 + [_I64] * 3 + [_I, _I], None), "amx_init": ([], _I)},
}
_FLAGS = {"linear_amx": ["-mamx-tile", "-mamx-bf16"]}   # beyond the common ones
_BASE = ("linear_bf16", "paged_attention", "norm_act", "row_max")               # built by _load; linear_amx on demand
_state: dict = {}   # the loaded functions by name, and what _load / amx_available found


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in _cpu_flags()


def _build(name: str):
    """Compile kernels/<name>.c (once per source hash) and put its functions into _state."""
    source_path = _HERE / f"{name}.c"
    flags = ["-O3", "-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl", "-ffp-contract=off",
             *_FLAGS.get(name, []), "-fopenmp", "-shared", "-fPIC"]
    digest = hashlib.sha256(source_path.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("RECURSA_KERNEL_CACHE", Path.home() / ".cache" / "recursa" / "kernels"))
    target = cache / digest / f"{name}.so"
    if not target.is_file():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(source_path), "-o", tmp, "-lm"],
                           check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        except subprocess.CalledProcessError as e:
            raise OSError(f"building {source_path.name} failed: {e.stderr.strip()[:300]}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    library = ctypes.CDLL(str(target))
    for function, (argtypes, restype) in _SIGNATURES[name].items():
        fn = getattr(library, "recursa_" + function)
        fn.argtypes, fn.restype = argtypes, restype
        _state[function] = fn


def _load():
    if "reason" not in _state:
        _state["reason"] = None
        if os.environ.get("RECURSA_KERNELS", "1") == "0":
            _state["reason"] = "turned off by RECURSA_KERNELS=0"
        elif not _cpu_has_avx512_bf16():
            _state["reason"] = "the CPU has no AVX512-BF16"
        else:
            try:
                for name in _BASE:
                    _build(name)
            except OSError as e:
                _state["reason"] = str(e)
    return _state["reason"] is None


def available() -> bool:
    return _load()


def unavailable_reason() -> str | None:
    _load()
    return _state["reason"]


def amx_available() -> bool:
    """Whether linear_amx runs here: the other kernels, AMX-BF16 in the CPU, the compiler's AMX
    support and the kernel's permission to use the tile state (asked of Linux once per process)."""
    if "amx" not in _state:
        ok = _load() and os.environ.get("RECURSA_AMX", "1") != "0" and {"amx_bf16", "amx_tile"} <= _cpu_flags()
        if ok:
            try:
                _build("linear_amx")
                ok = _state["amx_init"]() == 0
            except OSError:   # e.g. a compiler without AMX support: the other kernels still serve
                ok = False
        _state["amx"] = ok
    return _state["amx"]


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


def linear_amx_int(x: torch.Tensor, wq: torch.Tensor, sm: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """x [..., K] bf16 @ w.T -> [..., n] bf16 with w given as pack_amx_int4 (bits 4) or pack_amx_int8 (8)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    _state["linear_amx_int"](x2.data_ptr(), wq.data_ptr(), sm.data_ptr(), y.data_ptr(), x2.shape[0],
                             x2.shape[1], n, bits, torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def supports(w: torch.Tensor) -> bool:
    """Whether linear_bf16 can take weight w: [N, K] bf16 on the CPU, contiguous, K a multiple of 32."""
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous()
            and w.shape[1] % 32 == 0 and available())


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 @ w[N, K].T -> [..., N] bf16 (the caller checked `supports(w)`). Eager: a
    direct call (~10 us less than through the dispatcher); compiled graphs call `linear_bf16_op`."""
    _load()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.bfloat16)
    _state["linear_bf16"](x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1],
                                      w.shape[0], torch.get_num_threads())
    return y.view(*x.shape[:-1], w.shape[0])


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
    _state["linear_amx"](x2.data_ptr(), wp.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1], n,
                         torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def supports_elementwise(x: torch.Tensor) -> bool:
    """Whether rms_norm_bf16 / silu_mul_bf16 take x: bf16 on the CPU, last size a multiple of 16, in
    eager inference (no autograd: they have no backward; compiled graphs fuse these ops themselves)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[-1] % 16 == 0
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and available())


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """bf16(weight * bf16(x / rms(x))) over the last dim, as F.rms_norm then a bf16 multiply round."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _state["rms_norm_bf16"](x.data_ptr(), None if weight is None else weight.data_ptr(), y.data_ptr(),
                            x.numel() // x.shape[-1], x.shape[-1], eps, torch.get_num_threads())
    return y


def silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor:
    """bf16(bf16(silu(gate)) * up) for gate_up [..., 2 * ffn] = (gate, up), as F.silu then a multiply."""
    gate_up = gate_up.contiguous()
    ffn = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], ffn)
    _state["silu_mul_bf16"](gate_up.data_ptr(), y.data_ptr(), gate_up.numel() // (2 * ffn), ffn,
                            torch.get_num_threads())
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
    _state["rope_qk"](qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), n,
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
    status = _state["kv_write"](k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], slots.data_ptr(),
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
    _state["row_max"](x.data_ptr(), best.data_ptr(), index.data_ptr(), x.shape[0], x.shape[1],
                      int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return best, index


def supports_attention(n_heads: int, k_cache: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether paged_decode_attention takes queries of `dtype` with n_heads heads over k_cache: CPU,
    fp32 or bf16 (the cache's), head size a multiple of 16 (<= 256), <= 16 query heads per kv head."""
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    return (k_cache.device.type == "cpu" and k_cache.dtype in (torch.float32, torch.bfloat16) and dtype == k_cache.dtype
            and hd % 16 == 0 and hd <= 256 and n_heads % n_kv == 0 and n_heads // n_kv <= 16 and available())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                           offset: int, lens: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(hd)) V for one query per request over its cached positions, read in place.

    q [B, H, hd]; k_cache, v_cache [slots, Hkv, hd] (q's dtype); slots [B, Smax] int64: the slot of
    each position at cache layer 0, `offset` added for the depth's layer; lens [B] int64: request b
    sees positions 0 .. lens[b] - 1. Returns [B, H, hd]. The caller checked `supports_attention`."""
    _load()
    q = q.contiguous()
    out = torch.empty_like(q)
    B, H, hd = q.shape
    status = _state["paged_decode_attention"](q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                                       slots.shape[1], offset, lens.data_ptr(), out.data_ptr(), B, H,
                                       k_cache.shape[1], hd, hd ** -0.5, int(q.dtype == torch.bfloat16),
                                       torch.get_num_threads())
    if status:
        raise RuntimeError(f"paged_decode_attention failed (status {status})")
    return out


# The ops compiled graphs call: declared with a schema and a CPU implementation on a torch.library
# Library (~10 us a call, against ~22 us through torch.library.custom_op's wrapper), plus the fake
# implementations torch.compile traces shapes with.
_LIBRARY = torch.library.Library("recursa", "DEF")
_LIBRARY.define("linear_bf16(Tensor x, Tensor w) -> Tensor")
_LIBRARY.impl("linear_bf16", linear_bf16, "CPU")
_LIBRARY.define("linear_amx(Tensor x, Tensor wp, int n) -> Tensor")
_LIBRARY.impl("linear_amx", linear_amx, "CPU")
_LIBRARY.define("linear_amx_int(Tensor x, Tensor wq, Tensor sm, int n, int bits) -> Tensor")
_LIBRARY.impl("linear_amx_int", linear_amx_int, "CPU")
_LIBRARY.define("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, int offset, "
                "Tensor lens) -> Tensor")
_LIBRARY.impl("paged_decode_attention", paged_decode_attention, "CPU")


@torch.library.register_fake("recursa::linear_bf16")
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.register_fake("recursa::linear_amx")
def _(x, wp, n):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.register_fake("recursa::linear_amx_int")
def _(x, wq, sm, n, bits):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.register_fake("recursa::paged_decode_attention")
def _(q, k_cache, v_cache, slots, offset, lens):
    return torch.empty_like(q)


linear_bf16_op = torch.ops.recursa.linear_bf16
linear_amx_op = torch.ops.recursa.linear_amx
linear_amx_int_op = torch.ops.recursa.linear_amx_int
paged_decode_attention_op = torch.ops.recursa.paged_decode_attention
