"""Roofline for decoding: how close a measured decode rate comes to this machine's limits.

Two ceilings, both measured on the machine the benchmark runs on, with the benchmark's thread count:

- `measure_bandwidth`: streaming memory bandwidth (best of several copies of a tensor far larger
  than the last-level cache; read + write bytes counted).
- `measure_matmul`: matmul throughput (best of several large square fp32 matmuls, 2 n^3 FLOPs).

`Ceilings.measure` takes both, per wall-clock second and per CPU-second of this process (on a
shared machine the second is the stable one; see Ceilings). From the model's shapes, two
per-token costs:

- `decode_bytes_per_token`: what one batch-1 decode step must read from memory.
- `decode_flops_per_token`: what one decode step computes, at any batch size.

A batch-1 decode step is ideally memory bound (each weight is read once per token, and used for
one multiply-add), so its natural fraction is bytes/token x tok/s / bandwidth. A large-batch
step reuses each weight for every token in the batch, so it is ideally compute bound and its
fraction is FLOPs/token x tok/s / matmul peak. `roofline(...)` computes both for one run.

Used by benchmarks/throughput.py (which prints the table); standalone, this prints the two
machine ceilings, and with --model the per-token costs of a model and how fast its bare linear
layers run at batch 1 and 32 (how much of the gap is the BLAS kernels'):

    .venv/bin/python benchmarks/roofline.py --model models/smollm2-135m --threads 1
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- machine ceilings ---------------------------------------------------------------------------
def _best(fn, threads: int, repeats: int) -> tuple[float, float]:
    """Shortest wall-clock time and shortest process CPU time of `repeats` calls of fn (after one
    warm-up call), with `threads` intra-op threads."""
    wall = cpu = float("inf")
    with _threads(threads):
        fn()
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def _bandwidth_times(threads: int, mib: int, repeats: int) -> tuple[float, tuple[float, float]]:
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)  # filled, so every page is really mapped
    dst = torch.zeros(n, dtype=torch.float32)
    return 2 * n * 4, _best(lambda: dst.copy_(src), threads, repeats)


def _matmul_times(threads: int, dtype: torch.dtype, n: int, repeats: int) -> tuple[float, tuple[float, float]]:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    return 2 * n**3, _best(lambda: torch.mm(a, b, out=c), threads, repeats)


def measure_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Streaming memory bandwidth in bytes/s: best of `repeats` `dst.copy_(src)` of `mib` MiB.

    Each copy reads `src` and writes `dst`, so it moves 2 x size bytes (write-allocate traffic,
    which real hardware may add on top, is not counted: the number is what a program sees). The
    tensors are 8x the 32 MiB L3 of the reference machine, so the copy streams from DRAM.
    """
    nbytes, (wall, _) = _bandwidth_times(threads, mib, repeats)
    return nbytes / wall


def measure_matmul(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3) -> float:
    """Matmul throughput in FLOP/s: best of `repeats` [n, n] @ [n, n] products (2 n^3 FLOPs each).

    n = 2048 is compute bound on a CPU (arithmetic intensity n/6 FLOP/byte in fp32) and large
    enough for the BLAS kernel to reach its steady state; one call takes ~0.2-1 s on one core.
    """
    flops, (wall, _) = _matmul_times(threads, dtype, n, repeats)
    return flops / wall


@dataclass
class Ceilings:
    """The machine's ceilings per wall-clock second and per CPU-second of this process.

    On a machine shared with other jobs a run only gets part of its cores (its CPU share, process
    CPU time / wall time), and so do the short bursts that measure the ceilings, by a different
    amount. The wall-clock fractions are what the issue asks for; the per-CPU-second fractions
    (achieved rate / CPU share against the ceiling per CPU-second) cancel the time-sharing and say
    how well the work uses the cycles it got.
    """

    bandwidth: float  # bytes/s
    matmul: float  # FLOP/s
    bandwidth_cpu: float  # bytes per CPU-second
    matmul_cpu: float  # FLOP per CPU-second

    @classmethod
    def measure(cls, threads: int) -> Ceilings:
        nbytes, (bw_wall, bw_cpu) = _bandwidth_times(threads, 256, 5)
        flops, (mm_wall, mm_cpu) = _matmul_times(threads, torch.float32, 2048, 3)
        return cls(nbytes / bw_wall, flops / mm_wall, nbytes / bw_cpu, flops / mm_cpu)


# ---- per-token costs ----------------------------------------------------------------------------
def _numel_bytes(params) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _per_token(model) -> dict:
    """Parameters and bytes one token passes through: every depth's stage (a shared layer counted
    once per depth that runs it) plus its LoRA adapters, then the final norm and the LM head."""
    layer_params = layer_bytes = 0
    for d in range(model.depth):
        adapters = model.adapters(d)
        n, b = _numel_bytes(list(model.stage(d).parameters()) + (list(adapters.parameters()) if adapters else []))
        layer_params += n
        layer_bytes += b
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    norm_params, norm_bytes = _numel_bytes(model.norm.parameters())
    return {"layer_params": layer_params + norm_params, "layer_bytes": layer_bytes + norm_bytes,
            "head_params": head.numel(), "head_bytes": head.numel() * head.element_size()}


def decode_bytes_per_token(model, context_len: float) -> float:
    """Bytes one batch-1 decode step must read from memory, attending to `context_len` positions.

    Assumptions (a lower bound on the traffic, so the resulting fraction is an upper bound on
    what a perfect implementation would need to beat):
    - Every depth reads the weights of the stage that runs it, once: a vanilla model reads all
      its layer parameters; a weight-shared (recursive) model re-reads a shared layer at every
      depth that runs it (one 135M-class layer is ~14 MB in fp32, and the whole stack does not
      stay cached between depths). Relaxed models add their per-depth LoRA adapters.
    - The token runs the full depth (no early exit); exit heads and MoR routers are not counted.
    - The final norm and the LM head matrix are read (for a tied model that is the embedding
      matrix); the embedding *lookup* reads one row and is not counted.
    - The KV cache is read in full at every depth: 2 (K, V) x n_kv_heads x head_dim x element
      size x depth x context_len (MoR KV sharing reads the same amount, from fewer blocks). The
      new token's K/V write and activations (a few KB) are ignored.
    """
    cfg, costs = model.cfg, _per_token(model)
    elem = model.embed_tokens.weight.element_size()
    kv = 2 * cfg.n_kv_heads * cfg.head_dim * elem * model.depth * context_len
    return costs["layer_bytes"] + costs["head_bytes"] + kv


def decode_flops_per_token(model, context_len: float) -> float:
    """FLOPs of one decode step for one token attending to `context_len` positions.

    2 x the parameters the token multiplies through (per depth, as in decode_bytes_per_token,
    norms included), plus attention 4 x n_heads x head_dim x context_len x depth (QK^T and PV),
    plus the LM head 2 x dim x vocab. Elementwise work (RoPE, softmax, activations) is ignored.
    """
    cfg, costs = model.cfg, _per_token(model)
    attention = 4 * cfg.n_heads * cfg.head_dim * context_len * model.depth
    return 2 * costs["layer_params"] + attention + 2 * costs["head_params"]


def linear_layers_time(model, batch: int, threads: int, repeats: int = 3) -> tuple[float, float]:
    """Best wall and CPU seconds to multiply a [batch, in] input through every matrix of the model
    once (each unique weight once, the tied embedding as the head), with nothing else of a decode
    step: the part of the gap to the ceilings that is the BLAS kernels' own, not the framework's."""
    import torch.nn.functional as F

    weights = [p for p in model.parameters() if p.dim() == 2]
    inputs = [torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights]
    with torch.inference_mode():
        return _best(lambda: [F.linear(x, w) for x, w in zip(inputs, weights)], threads, repeats)


# ---- measured rates -----------------------------------------------------------------------------
def mean_context(batches: list[list[list[int]]], lengths: list[list[int]]) -> float:
    """Mean context a decode step attends to over a run: prompt length + half the new tokens."""
    ctx = [len(p) + n / 2 for batch, lens in zip(batches, lengths) for p, n in zip(batch, lens)]
    return sum(ctx) / len(ctx)


def decode_rate(token_times: list[list[float]]) -> float:
    """Decode tokens/s: output tokens after each request's first (which prefill produces),
    divided by the time during which some request was decoding (the union of the requests'
    [first token, last token] intervals: their sum when requests run one after another, the
    span when they run together). Prefill time is excluded, unlike the run's output tok/s."""
    spans = sorted((t[0], t[-1]) for t in token_times if len(t) > 1)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    tokens = sum(len(t) - 1 for t in token_times if len(t) > 1)
    return tokens / busy if busy > 0 else float("nan")


def roofline(model, context_len: float, decode_tok_s: float, ceilings: Ceilings, cpu_share: float) -> dict:
    """Achieved bytes/s and FLOP/s of a run and their fractions of the machine's ceilings, per
    wall-clock second and per CPU-second (cpu_share: the run's process CPU time / wall time).

    The bandwidth fraction assumes batch-1 traffic (weights read once per token) and is only
    meaningful for a batch-1 run; the FLOP fraction is meaningful at any batch size.
    """
    bpt = decode_bytes_per_token(model, context_len)
    fpt = decode_flops_per_token(model, context_len)
    bytes_s, flop_s = bpt * decode_tok_s, fpt * decode_tok_s
    return {"context_len": context_len, "decode_tok_s": decode_tok_s, "bytes_per_token": bpt,
            "flops_per_token": fpt, "achieved_bytes_s": bytes_s, "achieved_flop_s": flop_s, "cpu_share": cpu_share,
            "bandwidth_fraction": bytes_s / ceilings.bandwidth, "flop_fraction": flop_s / ceilings.matmul,
            "bandwidth_fraction_cpu": bytes_s / cpu_share / ceilings.bandwidth_cpu,
            "flop_fraction_cpu": flop_s / cpu_share / ceilings.matmul_cpu}


def format_table(rows: list[dict], ceilings: Ceilings) -> str:
    """rows: {"run", "batch1": bool, **roofline(...)}; only batch-1 rows show the bandwidth
    fraction. "/cpu" columns are the per-CPU-second fractions (see Ceilings)."""
    c = ceilings
    lines = [(f"roofline: memory bandwidth {c.bandwidth / 1e9:.1f} GB/s ({c.bandwidth_cpu / 1e9:.1f} per CPU-s), "
              f"fp32 matmul peak {c.matmul / 1e9:.1f} GFLOP/s ({c.matmul_cpu / 1e9:.1f} per CPU-s)"),
             (f"{'run':<50}{'decode tok/s':>13}{'ctx':>6}{'MB/tok':>8}{'GB/s':>7}{'%BW':>6}{'/cpu':>6}"
              f"{'MFLOP/tok':>10}{'GFLOP/s':>8}{'%peak':>7}{'/cpu':>6}{'CPU':>6}")]
    for r in rows:
        bw = (f"{r['achieved_bytes_s'] / 1e9:>7.2f}{r['bandwidth_fraction']:>6.0%}{r['bandwidth_fraction_cpu']:>6.0%}"
              if r["batch1"] else f"{'-':>7}{'-':>6}{'-':>6}")
        lines.append(f"{r['run']:<50}{r['decode_tok_s']:>13.1f}{r['context_len']:>6.1f}"
                     f"{r['bytes_per_token'] / 1e6:>8.1f}{bw}{r['flops_per_token'] / 1e6:>10.1f}"
                     f"{r['achieved_flop_s'] / 1e9:>8.2f}{r['flop_fraction']:>7.0%}{r['flop_fraction_cpu']:>6.0%}"
                     f"{r['cpu_share']:>6.0%}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a recursa model directory (optional)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=float, default=32.0, help="context length for the per-token costs")
    args = ap.parse_args()
    c = Ceilings.measure(args.threads)
    print(f"memory bandwidth ({args.threads} threads): {c.bandwidth / 1e9:.2f} GB/s, "
          f"{c.bandwidth_cpu / 1e9:.2f} GB per CPU-second")
    print(f"fp32 matmul peak ({args.threads} threads): {c.matmul / 1e9:.2f} GFLOP/s, "
          f"{c.matmul_cpu / 1e9:.2f} GFLOP per CPU-second")
    if args.model:
        from recursa.model import load

        model = load(args.model)
        ctx = args.context
        weights = [p for p in model.parameters() if p.dim() == 2]
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        for batch in (1, 32):
            wall, cpu = linear_layers_time(model, batch, args.threads)
            flops = 2 * batch * sum(w.numel() for w in weights)
            print(f"bare linear layers at batch {batch} ({len(weights)} matrices, {nbytes / 1e6:.0f} MB): "
                  f"{wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU = {nbytes / cpu / 1e9:.1f} GB and "
                  f"{flops / cpu / 1e9:.1f} GFLOP per CPU-second")
        print(f"decode bytes/token at context {ctx:g}: {decode_bytes_per_token(model, ctx) / 1e6:.1f} MB")
        print(f"decode FLOPs/token at context {ctx:g}: {decode_flops_per_token(model, ctx) / 1e6:.1f} MFLOP")


if __name__ == "__main__":
    main()
