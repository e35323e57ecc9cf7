"""Roofline per weight format: the bytes a decode step actually reads, and the bare-kernel ceilings.

benchmarks/roofline.py counts fp32 weights. A model stored in bf16, int8 or int4 reads fewer bytes
per token, through a different kernel, so each format gets its own ceilings here, measured with
the kernels an engine would call, on every matrix of the model (each unique weight once, the tied
embedding as the LM head; q/k/v and gate/up as separate matrices):

- fp32, bf16: `F.linear` with weights and inputs in that dtype.
- int8: `torch._weight_int8pack_mm` (int8 weights, one bf16 scale per output channel, bf16 input).
- int4: `torch._weight_int4pack_mm_for_cpu` (4-bit weights packed two per byte, groups of 32
  along the input dimension, a bf16 scale and zero point per group, bf16 input): the layout of
  llama.cpp's Q4_1 (per block of 32 weights: 16 bytes of nibbles, an fp16 scale and minimum).

For each format: bytes per decode token (weights in their stored format, scales included, plus the
KV cache read in the compute dtype), the kernel's time for all matrices at batch 1 (the batch-1
ceiling in tokens/s) and at batch 32, and its GEMM peak (FLOP/s of one layer's matrices at batch 256,
where the kernel is compute bound; one layer, not the model, to keep the measurement short). `fractions(...)` puts a measured decode rate against them:
batch-1 tok/s as a fraction of its format's kernel ceiling and of the copy bandwidth (bytes/token x
tok/s / bandwidth); large-batch tok/s x FLOPs/token as a fraction of its format's GEMM peak.

    .venv/bin/python benchmarks/roofline_dtypes.py --model models/smollm2-135m --threads 2

Used by benchmarks/peers.py. Timings are the best of a few repeats (a shared machine only slows
them down), so ceilings are optimistic and the fractions conservative.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

FORMATS = ("fp32", "bf16", "int8", "int4")
GROUP = 32  # int4 group size along the input dimension
COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}
PEAK_BATCH = 256


def matrix_bytes(n_out: int, n_in: int, fmt: str) -> int:
    """Bytes of one [n_out, n_in] weight matrix stored in `fmt`, scales and zero points included."""
    if fmt == "fp32":
        return 4 * n_out * n_in
    if fmt == "bf16":
        return 2 * n_out * n_in
    if fmt == "int8":
        return n_out * n_in + 2 * n_out  # + one bf16 scale per output channel
    if fmt in ("int4", "q4_1"):
        return n_out * n_in // 2 + 2 * 2 * n_out * (n_in // GROUP)  # + bf16 scale and zero per group
    raise ValueError(f"unknown format {fmt!r}")


def model_matrices(model) -> list[torch.Tensor]:
    """Every weight matrix a decode token multiplies through once (unique 2-D parameters)."""
    lookup_only = model.embed_tokens.weight if model.lm_head is not None else None  # untied: a row lookup
    return [p.detach() for p in model.parameters() if p.dim() == 2 and p is not lookup_only]


def decode_bytes(model, fmt: str, context_len: float, weight_bytes: int | None = None) -> float:
    """Bytes one batch-1 decode step reads: the matrices in `fmt` (or `weight_bytes` when an engine
    stores them otherwise, e.g. a GGUF file's own tensors), the norms in fp32, and the KV cache at
    `context_len` positions in the format's compute dtype, for every depth."""
    cfg = model.cfg
    if weight_bytes is None:
        weight_bytes = sum(matrix_bytes(*w.shape, fmt) for w in model_matrices(model))
    norms = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 1)
    kv_elem = torch.finfo(COMPUTE.get(fmt, torch.bfloat16)).bits // 8
    kv = 2 * cfg.n_kv_heads * cfg.head_dim * kv_elem * model.depth * context_len
    return weight_bytes + norms + kv


# ---- the kernels --------------------------------------------------------------------------------
def _int8(w: torch.Tensor):
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    q = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    s = scale.to(torch.bfloat16)
    return lambda x: torch._weight_int8pack_mm(x, q, s)


def _int4(w: torch.Tensor):
    n, k = w.shape
    g = w.reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    # the kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale
    sz = torch.stack([scale.T, (lo + 8 * scale).T], -1).to(torch.bfloat16).contiguous()
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)


def kernels(matrices: list[torch.Tensor], fmt: str) -> list:
    """One callable x -> x @ W^T per matrix, with W prepared in `fmt` (prepared once, not timed)."""
    if fmt in ("fp32", "bf16"):
        ws = [w.to(COMPUTE[fmt]).contiguous() for w in matrices]
        return [lambda x, w=w: F.linear(x, w) for w in ws]
    prepare = {"int8": _int8, "int4": _int4}[fmt]
    return [prepare(w.float()) for w in matrices]


def kernel_seconds(matrices, fmt: str, batch: int, threads: int, repeats: int = 5) -> float:
    """Best wall seconds to multiply a [batch, in] input through every matrix once in `fmt`."""
    fns = kernels(matrices, fmt)
    xs = [torch.randn(batch, w.shape[1], dtype=COMPUTE[fmt]) for w in matrices]
    with torch.inference_mode():
        wall, _ = roofline._best(lambda: [f(x) for f, x in zip(fns, xs)], threads, repeats)
    return wall


@dataclass
class FormatCeilings:
    fmt: str
    weight_bytes: int          # all matrices in the stored format
    batch1_tok_s: float        # 1 / kernel time for all matrices at batch 1
    batch32_tok_s: float       # 32 / kernel time at batch 32
    gemm_peak_flop_s: float    # FLOP/s of the first layer's matrices at batch PEAK_BATCH


def measure(model, threads: int, formats=FORMATS, quick: bool = False) -> dict:
    """Copy bandwidth and per-format kernel ceilings for `model`'s matrices, with `threads` threads."""
    mats = model_matrices(model)
    layer = [p.detach() for p in model.stage(0).parameters() if p.dim() == 2]  # the GEMM peak's sample
    layer_flops = 2 * PEAK_BATCH * sum(w.numel() for w in layer)
    reps = 1 if quick else 3
    out = {"threads": threads, "bandwidth_bytes_s": roofline.measure_bandwidth(threads, repeats=reps + 1), "formats": {}}
    for fmt in formats:
        t1 = kernel_seconds(mats, fmt, 1, threads, reps + 1)
        t32 = kernel_seconds(mats, fmt, 32, threads, reps)
        tp = kernel_seconds(layer, fmt, PEAK_BATCH, threads, reps)
        out["formats"][fmt] = asdict(FormatCeilings(fmt, sum(matrix_bytes(*w.shape, fmt) for w in mats),
                                                    1 / t1, 32 / t32, layer_flops / tp))
    return out


def fractions(model, ceilings: dict, fmt: str, context_len: float, batch1_tok_s: float | None,
              many_tok_s: float | None, weight_bytes: int | None = None) -> dict:
    """A row's decode rates against the ceilings of its format (`fmt`; q4_1 is held against int4)."""
    c = ceilings["formats"]["int4" if fmt == "q4_1" else fmt]
    bpt = decode_bytes(model, fmt, context_len, weight_bytes)
    fpt = roofline.decode_flops_per_token(model, context_len)
    row = {"format": fmt, "bytes_per_token": bpt, "flops_per_token": fpt}
    if batch1_tok_s:
        row.update(batch1_of_kernel=batch1_tok_s / c["batch1_tok_s"],
                   batch1_bytes_s=bpt * batch1_tok_s, batch1_of_bandwidth=bpt * batch1_tok_s / ceilings["bandwidth_bytes_s"])
    if many_tok_s:
        row.update(many_of_kernel32=many_tok_s / c["batch32_tok_s"], many_flop_s=fpt * many_tok_s,
                   many_of_gemm_peak=fpt * many_tok_s / c["gemm_peak_flop_s"])
    return row


def format_ceilings(ceilings: dict) -> str:
    lines = [f"copy bandwidth {ceilings['bandwidth_bytes_s'] / 1e9:.1f} GB/s ({ceilings['threads']} threads); "
             f"bare kernels on all matrices (weights only):",
             f"{'format':<8}{'MB read':>9}{'batch-1 tok/s':>15}{'batch-32 tok/s':>16}{'GEMM peak GFLOP/s':>19}"]
    for fmt, c in ceilings["formats"].items():
        lines.append(f"{fmt:<8}{c['weight_bytes'] / 1e6:>9.1f}{c['batch1_tok_s']:>15.1f}"
                     f"{c['batch32_tok_s']:>16.1f}{c['gemm_peak_flop_s'] / 1e9:>19.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "smollm2-135m"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--context", type=float, default=60.0, help="context length for the KV bytes")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    from recursa.model import load

    model = load(args.model)
    ceilings = measure(model, args.threads, quick=args.quick)
    print(format_ceilings(ceilings))
    for fmt in FORMATS:
        print(f"{fmt}: {decode_bytes(model, fmt, args.context) / 1e6:.1f} MB read per batch-1 decode token "
              f"at context {args.context:g}")
    print(json.dumps({"benchmark": "roofline_dtypes", "model": args.model, "context": args.context, **ceilings}))


if __name__ == "__main__":
    main()
