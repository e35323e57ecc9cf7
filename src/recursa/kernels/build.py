"""Compiling and loading recursa's C kernels (see recursa.kernels): one shared library per source,
built once per source-and-flags hash with the system compiler, loaded through ctypes; what this
CPU and toolchain allow is decided here, once per process."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_HERE = Path(__file__).parent
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {   # C source -> {function (without its recursa_ prefix): (argument types, return type)}
    "linear_bf16": {"linear_bf16": ([_P] * 3 + [_I64] * 3 + [_I], None)},
    "paged_attention": {"paged_decode_attention": ([_P] * 4 + [_I64] * 2 + [_P] * 3 + [_I64] * 4
                                                   + [ctypes.c_float, _I, _I], _I)},
    "norm_act": {"rms_norm": ([_P] * 3 + [_I64] * 2 + [ctypes.c_float, _I, _I], None),
                 "silu_mul": ([_P] * 2 + [_I64] * 2 + [_I, _I], None),
                 "rope_qk": ([_P] * 4 + [_I64] * 4 + [_I, _I], None),
                 "kv_write": ([_P, _P, _I64, _P, _P, _P] + [_I64] * 8, _I)},
    "decode_span": {"decode_span": ([_P, _P, _I64] + [_P] * 5 + [_I64, _P, _I64, _P, _P, _I64, _I64, _P, _P] + [_I64] * 6
                                    + [ctypes.c_float] * 2 + [_I, _I, _P, _I64], _I)},
    "linear_int4": {"linear_int4": ([_P] * 4 + [_I64] * 3 + [_I, _I], None)},
    "row_max": {"row_max": ([_P] * 3 + [_I64] * 2 + [_I, _I], None)},
    "linear_f32": {"linear_f32": ([_P] * 3 + [_I64] * 3 + [_I], None)},
    "linear_amx": {"linear_amx": ([_P] * 3 + [_I64] * 3 + [_I], None),
                   "linear_amx_int": ([_P] * 4 + [_I64] * 3 + [_I, _I], None), "amx_init": ([], _I)},
}
_FLAGS = {"linear_amx": ["-mamx-tile", "-mamx-bf16"]}   # beyond the ISA's
# what each instruction set builds (linear_amx on demand): AVX-512 with BF16 everything; AVX2 + FMA
# the kernels written against simd.h (fp32 matmul, norms, rope, attention, greedy maxima, decode
# spans; bf16 tensors through them widened and rounded in software), not the bf16 / int4 matmuls
_ISA = {"avx512": (["-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl"],
                   ("linear_bf16", "linear_f32", "linear_int4", "paged_attention", "norm_act", "row_max", "decode_span")),
        "avx2": (["-mavx2", "-mfma", "-mf16c"], ("linear_f32", "paged_attention", "norm_act", "row_max", "decode_span"))}
_state: dict = {}   # the loaded functions by name, and what _load / amx_available found


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def isa() -> str | None:
    """The instruction set the kernels build for here: "avx512" (AVX512-BF16), "avx2" (AVX2 + FMA)
    or None; RECURSA_KERNEL_ISA=avx2 picks the AVX2 build on an AVX-512 CPU (to test it there)."""
    flags = _cpu_flags()
    have = "avx512" if "avx512_bf16" in flags else "avx2" if {"avx2", "fma"} <= flags else None
    asked = os.environ.get("RECURSA_KERNEL_ISA")
    return "avx2" if asked == "avx2" and have is not None else have


def _build(name: str):
    """Compile kernels/<name>.c (once per source hash) and put its functions into _state."""
    source_path = _HERE / f"{name}.c"
    flags = ["-O3", *_ISA[_state["isa"]][0], "-ffp-contract=off", *_FLAGS.get(name, []), "-fopenmp", "-shared",
             "-fPIC", f"-I{_HERE}"]
    header = (_HERE / "simd.h").read_bytes()
    digest = hashlib.sha256(source_path.read_bytes() + header + " ".join(flags).encode()).hexdigest()[:16]
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
        _state["reason"], _state["isa"] = None, isa()
        if os.environ.get("RECURSA_KERNELS", "1") == "0":
            _state["reason"] = "turned off by RECURSA_KERNELS=0"
        elif _state["isa"] is None:
            _state["reason"] = "the CPU has neither AVX512-BF16 nor AVX2 with FMA"
        else:
            try:
                for name in _ISA[_state["isa"]][1]:
                    _build(name)
            except OSError as e:
                _state["reason"] = str(e)
    return _state["reason"] is None


def available() -> bool:
    return _load()


def unavailable_reason() -> str | None:
    _load()
    return _state["reason"]


def has(function: str) -> bool:
    """Whether this build has `function` (e.g. "linear_bf16": AVX-512 builds only)."""
    return _load() and function in _state


def status() -> str:
    """"on" (AVX-512 build), "on (AVX2: ...)", or why the kernels are off (what engines and
    benchmarks report)."""
    if not _load():
        return _state["reason"]
    return "on" if _state["isa"] == "avx512" else "on (AVX2: fp32 kernels and decode spans; bf16 matmuls through oneDNN)"


def amx_available() -> bool:
    """Whether linear_amx runs here: the other kernels, AMX-BF16 in the CPU, the compiler's AMX
    support and the kernel's permission to use the tile state (asked of Linux once per process)."""
    if "amx" not in _state:
        ok = (_load() and _state["isa"] == "avx512" and os.environ.get("RECURSA_AMX", "1") != "0" and {"amx_bf16", "amx_tile"} <= _cpu_flags())
        if ok:
            try:
                _build("linear_amx")
                ok = _state["amx_init"]() == 0
            except OSError:   # e.g. a compiler without AMX support: the other kernels still serve
                ok = False
        _state["amx"] = ok
    return _state["amx"]
