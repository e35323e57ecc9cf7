"""Which instruction set recursa's C kernels build for, and the AVX2 build checked on AVX-512 CPUs.

The kernels written against simd.h build for AVX-512 (with BF16) or for AVX2 + FMA. On an AVX2
machine the kernel test files run against the AVX2 build directly; on an AVX-512 machine the last
test here runs them again in a subprocess under RECURSA_KERNEL_ISA=avx2, so both builds are
checked against their PyTorch references wherever the suite runs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recursa.kernels import build

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx2", "fma"}


@pytest.mark.parametrize("flags, asked, expected", [
    (AVX512, None, "avx512"), (AVX512, "avx2", "avx2"), ({"avx2", "fma"}, None, "avx2"),
    ({"avx2", "fma"}, "avx512", "avx2"), ({"avx2"}, None, None), (set(), "avx2", None)])
def test_isa_follows_the_cpu_flags_and_the_override(monkeypatch, flags, asked, expected):
    monkeypatch.setattr(build, "_cpu_flags", lambda: flags)
    if asked is None:
        monkeypatch.delenv("RECURSA_KERNEL_ISA", raising=False)
    else:
        monkeypatch.setenv("RECURSA_KERNEL_ISA", asked)
    assert build.isa() == expected


def test_a_cpu_without_avx2_keeps_the_pytorch_path_and_says_why(monkeypatch):
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"sse4_2"})
    monkeypatch.delenv("RECURSA_KERNELS", raising=False)
    assert not build.available() and not build.has("rms_norm")
    assert build.status() == "the CPU has neither AVX512-BF16 nor AVX2 with FMA"


def test_the_avx2_build_leaves_out_the_bf16_matmuls(monkeypatch):
    if build.isa() is None:
        pytest.skip("the CPU has neither AVX-512 nor AVX2")
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setenv("RECURSA_KERNEL_ISA", "avx2")
    monkeypatch.delenv("RECURSA_KERNELS", raising=False)
    assert build.available() and build.status().startswith("on (AVX2")
    assert build.has("decode_span") and build.has("linear_f32") and build.has("paged_decode_attention")
    assert not build.has("linear_bf16") and not build.has("linear_int4") and not build.amx_available()


def test_the_avx2_build_passes_the_kernel_tests_on_an_avx512_cpu():
    if build.isa() != "avx512" or os.environ.get("RECURSA_KERNEL_ISA") == "avx2":
        pytest.skip("not an AVX-512 CPU: the kernel tests already ran against the AVX2 build (or no build)")
    root = Path(__file__).resolve().parents[2]
    files = ["tests/model/test_norm_act_kernels.py", "tests/model/test_linear_f32.py",
             "tests/engine/test_paged_attention.py", "tests/engine/test_fused_decode.py"]
    env = {**os.environ, "RECURSA_KERNEL_ISA": "avx2"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
