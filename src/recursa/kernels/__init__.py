"""Hand-written CPU kernels, built from C on first use (a C compiler and OpenMP; no torch headers).

`linear_bf16(x, w)`: the bf16 matmul for a few rows (decode at small batch) through AVX512-BF16
dot products (`vdpbf16ps`, fp32 accumulation), reading each weight row once. PyTorch's bf16
F.linear (oneDNN) runs batch-1 GEMV on this kind of CPU at about half the memory bandwidth, below
even fp32 (benchmarks/RESULTS.md), and at batch 1 the weight read is the whole cost of a layer.

`paged_decode_attention(q, k_cache, v_cache, slots, offset, lens)`: attention of one query per
request over its paged cache, reading keys/values where they lie (fp32 or bf16): no gathered copy
of the context, no padding mask, one call per depth instead of a gather, a mask and SDPA.

Each source (kernels/*.c) compiles once per source hash into ~/.cache/recursa/kernels (override:
RECURSA_KERNEL_CACHE) with `cc -O3 -mavx512f -mavx512bf16 -fopenmp`, written to a temporary file
and renamed; the shared library joins the OpenMP runtime torch already loaded (one thread pool).
`available()` is False, with the reason in `unavailable_reason()`, where the CPU lacks AVX512-BF16,
no compiler is found, or a build fails: callers then keep the PyTorch path (F.linear, SDPA).
RECURSA_KERNELS=0 turns the kernels off. Inside torch.compile the kernels are the opaque custom
ops `recursa::linear_bf16` and `recursa::paged_decode_attention`.
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

_HERE = Path(__file__).parent
MAX_ROWS = 4   # rows (tokens) up to which the GEMV beats oneDNN; more rows go to F.linear
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {   # C source -> (function, argument types, return type)
    "linear_bf16": ("recursa_linear_bf16", [_P] * 3 + [_I64] * 3 + [_I], None),
    "paged_attention": ("recursa_paged_decode_attention",
                        [_P] * 4 + [_I64] * 2 + [_P] * 2 + [_I64] * 4 + [ctypes.c_float, _I, _I], _I),
}
_state: dict = {}


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _build(name: str):
    """The C function of kernels/<name>.c, compiled (once per source hash) and loaded."""
    source_path = _HERE / f"{name}.c"
    source = source_path.read_bytes()
    cache = Path(os.environ.get("RECURSA_KERNEL_CACHE", Path.home() / ".cache" / "recursa" / "kernels"))
    target = cache / hashlib.sha256(source).hexdigest()[:16] / f"{name}.so"
    if not target.is_file():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, "-O3", "-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl", "-fopenmp",
                            "-shared", "-fPIC", str(source_path), "-o", tmp, "-lm"],
                           check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        except subprocess.CalledProcessError as e:
            raise OSError(f"building {source_path.name} failed: {e.stderr.strip()[:300]}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    function, argtypes, restype = _SIGNATURES[name]
    fn = getattr(ctypes.CDLL(str(target)), function)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _load():
    if "reason" not in _state:
        _state["reason"] = None
        if os.environ.get("RECURSA_KERNELS", "1") == "0":
            _state["reason"] = "turned off by RECURSA_KERNELS=0"
        elif not _cpu_has_avx512_bf16():
            _state["reason"] = "the CPU has no AVX512-BF16"
        else:
            try:
                for name in _SIGNATURES:
                    _state[name] = _build(name)
            except OSError as e:
                _state["reason"] = str(e)
    return _state["reason"] is None


def available() -> bool:
    return _load()


def unavailable_reason() -> str | None:
    _load()
    return _state["reason"]


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
    status = _state["paged_attention"](q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
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
_LIBRARY.define("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, int offset, "
                "Tensor lens) -> Tensor")
_LIBRARY.impl("paged_decode_attention", paged_decode_attention, "CPU")


@torch.library.register_fake("recursa::linear_bf16")
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.register_fake("recursa::paged_decode_attention")
def _(q, k_cache, v_cache, slots, offset, lens):
    return torch.empty_like(q)


linear_bf16_op = torch.ops.recursa.linear_bf16
paged_decode_attention_op = torch.ops.recursa.paged_decode_attention
