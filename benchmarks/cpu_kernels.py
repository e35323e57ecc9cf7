"""recursa's CPU matmul kernels side by side with PyTorch's, on every matrix of SmolLM2-135M.

For each token count, one pass over all 30 layers' fused projections (q/k/v, o, gate/up, down;
random weights of the real shapes) plus the LM head, per weight format, timed interleaved
(kernel A, kernel B, kernel A, ...), median of --rounds passes. Reported as ms per pass and
the weight bytes it streams per second. Formats and kernels:

  fp32: F.linear (MKL) | MKL's prepacked GEMM | recursa's fp32 GEMM over panel-packed weights
  bf16: oneDNN's prepacked GEMM (what F.linear becomes) | recursa's GEMV (<= 4 rows) | AMX tiles
  int8: torch._weight_int8pack_mm | AMX tiles widened from int8
  int4: torch._weight_int4pack_mm_for_cpu | recursa's GEMV (<= 4 rows) | AMX tiles widened from int4 (groups of 32)

    .venv/bin/python benchmarks/cpu_kernels.py --threads 2 --rows 1,4,32,64,256
    .venv/bin/python benchmarks/cpu_kernels.py --formats fp32 --rows 1,2,4,8,16,32,64,128
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from recursa import kernels
from recursa.model.quant import Int4Linear, Int8Linear, int4_affine

LAYERS, DIM, FFN, KV, VOCAB = 30, 576, 1536, 192, 49152


def shapes():
    per_layer = [(DIM + 2 * KV, DIM), (DIM, DIM), (2 * FFN, DIM), (DIM, FFN)]
    return per_layer * LAYERS + [(VOCAB, DIM)]


def build(fmt: str):
    """{kernel name: [callable(x of its in-size) per matrix]} for one weight format."""
    g = torch.Generator().manual_seed(0)
    calls = {}
    for n, k in shapes():
        w = torch.randn(n, k, generator=g) * 0.05
        if fmt == "fp32":
            calls.setdefault("f.linear", []).append(lambda x, w=w: torch.nn.functional.linear(x, w))
            if torch._C.has_mkl:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 32)
                calls.setdefault("mkl", []).append(lambda x, p=packed, w=w: torch.ops.mkl._mkl_linear(x, p, w, None, 32))
            if kernels.available():
                calls.setdefault("recursa", []).append(lambda x, p=kernels.pack_f32(w), n=n: kernels.linear_f32(x, p, n))
        elif fmt == "bf16":
            wb = w.bfloat16()
            packed = torch.ops.mkldnn._reorder_linear_weight(wb, 32)
            calls.setdefault("onednn", []).append(lambda x, p=packed: torch.ops.mkldnn._linear_pointwise(
                x, p, None, "none", [], ""))
            calls.setdefault("gemv", []).append(lambda x, w=wb: kernels.linear_bf16(x, w))
            if kernels.amx_available():
                calls.setdefault("amx", []).append(lambda x, p=kernels.pack_amx(wb), n=n: kernels.linear_amx(x, p, n))
        elif fmt == "int8":
            m = Int8Linear.from_float(w)
            calls.setdefault("torch", []).append(lambda x, m=m: torch._weight_int8pack_mm(x, m.weight, m.scales))
            if m.amx_q is not None:
                calls.setdefault("amx", []).append(lambda x, m=m: m(x))
        else:
            q, scale, lo = int4_affine(w, 32)
            m = Int4Linear(q, scale, lo, 32)
            calls.setdefault("torch", []).append(lambda x, m=m: torch._weight_int4pack_mm_for_cpu(
                x, m.weight, 32, m.scales_and_zeros))
            if kernels.available():   # recursa's GEMV over the same layout (<= 4 rows: see main)
                calls.setdefault("gemv", []).append(lambda x, m=m: kernels.linear_int4(
                    x, m.weight, m.scales_and_zeros, m.out_features, 32))
            if m.amx_q is not None:
                calls.setdefault("amx", []).append(lambda x, m=m: kernels.linear_amx_int(x, m.amx_q, m.amx_sm, m.out_features, 4))
    return calls


def weight_bytes(fmt: str) -> int:
    per = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}[fmt]
    return int(sum(n * k for n, k in shapes()) * per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,32,64,256")
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for fmt in args.formats.split(","):
        calls = build(fmt)
        for rows in map(int, args.rows.split(",")):
            dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
            xs = {k: torch.randn(rows, k).to(dtype) for k in (DIM, FFN)}
            names = [n for n in calls if not (n == "gemv" and rows > kernels.MAX_ROWS)]
            times = {n: [] for n in names}
            for _ in range(args.rounds + 1):   # the first round warms up
                for name in names:
                    start = time.perf_counter()
                    for (n, k), fn in zip(shapes(), calls[name]):
                        fn(xs[k])
                    times[name].append(time.perf_counter() - start)
            for name in names:
                t = statistics.median(times[name][1:])
                results.append({"format": fmt, "rows": rows, "kernel": name, "ms": t * 1e3,
                                "gb_s": weight_bytes(fmt) / t / 1e9})
                print(f"{fmt:<5} rows {rows:>4}  {name:<7} {t * 1e3:8.2f} ms  {weight_bytes(fmt) / t / 1e9:6.1f} GB/s",
                      flush=True)
    print(json.dumps({"benchmark": "cpu_kernels", "threads": args.threads, "amx": kernels.amx_available(),
                      "results": results}))


if __name__ == "__main__":
    main()
