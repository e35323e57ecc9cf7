"""Hand-written CPU kernels, built from C on first use (a C compiler and OpenMP; no torch headers).

`linear_bf16(x, w)`: the bf16 matmul for a few rows (decode at small batch) through AVX512-BF16
dot products (`vdpbf16ps`, fp32 accumulation), reading each weight row once. PyTorch's bf16
F.linear (oneDNN) runs batch-1 GEMV on this kind of CPU at about half the memory bandwidth, below
even fp32 (benchmarks/RESULTS.md), and at batch 1 the weight read is the whole cost of a layer.

The source (linear_bf16.c) compiles once per source hash into ~/.cache/recursa/kernels (override:
RECURSA_KERNEL_CACHE) with `cc -O3 -mavx512f -mavx512bf16 -fopenmp`, written to a temporary file
and renamed; the shared library joins the OpenMP runtime torch already loaded (one thread pool).
`available()` is False, with the reason in `unavailable_reason()`, where the CPU lacks AVX512-BF16,
no compiler is found, or the build fails: callers then keep F.linear. RECURSA_KERNELS=0 turns
the kernels off. Inside torch.compile the kernel is the opaque custom op `recursa::linear_bf16`.
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

_SOURCE = Path(__file__).with_name("linear_bf16.c")
MAX_ROWS = 4   # rows (tokens) up to which the kernel beats oneDNN; more rows go to F.linear
_state: dict = {}


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _build() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    cache = Path(os.environ.get("RECURSA_KERNEL_CACHE", Path.home() / ".cache" / "recursa" / "kernels"))
    target = cache / hashlib.sha256(source).hexdigest()[:16] / "linear_bf16.so"
    if not target.is_file():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, "-O3", "-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl", "-fopenmp",
                            "-shared", "-fPIC", str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        except subprocess.CalledProcessError as e:
            raise OSError(f"building {_SOURCE.name} failed: {e.stderr.strip()[:300]}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.recursa_linear_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.recursa_linear_bf16.restype = None
    return lib


def _load():
    if "lib" not in _state:
        _state["lib"], _state["reason"] = None, None
        if os.environ.get("RECURSA_KERNELS", "1") == "0":
            _state["reason"] = "turned off by RECURSA_KERNELS=0"
        elif not _cpu_has_avx512_bf16():
            _state["reason"] = "the CPU has no AVX512-BF16"
        else:
            try:
                _state["lib"] = _build()
            except OSError as e:
                _state["reason"] = str(e)
    return _state["lib"]


def available() -> bool:
    return _load() is not None


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
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], w.shape[0], dtype=torch.bfloat16)
    _state["lib"].recursa_linear_bf16(x2.data_ptr(), w.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1],
                                      w.shape[0], torch.get_num_threads())
    return y.view(*x.shape[:-1], w.shape[0])


linear_bf16_op = torch.library.custom_op("recursa::linear_bf16", mutates_args=())(linear_bf16)


@linear_bf16_op.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])
