"""Training throughput on this machine: tokens/s and achieved FLOP/s vs a measured matmul peak.

Runs the real training step (ForwardOutputs + default objective + AdamW + clipping) on synthetic
tokens for each preset, and times a large fp32 matmul in the same process as the reference
"peak". FLOPs per token = 6 * (non-embedding params + LM-head matmul) + 12 * layers * dim * seq
(attention scores and values, forward + backward). Prints a table, then one JSON line.

    python benchmarks/train_throughput.py                       # tiny and small, seq 256
    python benchmarks/train_throughput.py --presets small --seq-len 512 --batch-size 4 --steps 5
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import numpy as np
import torch

from recursa.presets import preset
from recursa.model import Decoder
from recursa.train.data import Batches
from recursa.train.losses import ForwardOutputs, default_objective


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best of `repeats` n^3 fp32 matmuls: the machine's practical peak (shared CPUs are noisy)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(model: Decoder, seq_len: int) -> float:
    cfg = model.cfg
    n = model.num_params(exclude_embeddings=True) + cfg.vocab_size * cfg.dim  # LM head matmul
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq_len


def bench(name: str, vocab: int, seq_len: int, batch_size: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = Decoder(preset(name, vocab_size=vocab, max_seq_len=max(seq_len, 256))).train()
    tokens = np.random.default_rng(0).integers(0, vocab, size=2_000_000).astype(np.uint16)
    batches = Batches(tokens, seq_len, batch_size, seed=0)
    forward, objective = ForwardOutputs(model), default_objective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss, _ = objective(forward, model, batches.next())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    tok_s = batch_size * seq_len / dt
    return {"preset": name, "params": model.num_params(), "seq_len": seq_len, "batch_size": batch_size,
            "step_s": dt, "tokens_per_s": tok_s, "flop_per_s": tok_s * flops_per_token(model, seq_len)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_flops()
    rows = [bench(n, args.vocab_size, args.seq_len, args.batch_size, args.steps, args.warmup) for n in args.presets]
    peak = max(peak, matmul_flops())  # measured before and after, in case the CPU was busy once
    print(f"matmul peak (fp32, 2048^3): {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} thread(s)")
    print(f"{'preset':8} {'params':>8} {'seq':>5} {'batch':>5} {'step s':>8} {'tok/s':>9} {'GFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        r["fraction_of_matmul_peak"] = r["flop_per_s"] / peak
        print(f"{r['preset']:8} {r['params'] / 1e6:7.2f}M {r['seq_len']:5d} {r['batch_size']:5d} {r['step_s']:8.3f} "
              f"{r['tokens_per_s']:9.0f} {r['flop_per_s'] / 1e9:8.2f} {r['fraction_of_matmul_peak']:8.1%}")
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = None
    print(json.dumps({"benchmark": "train_throughput", "git_rev": rev, "torch": torch.__version__,
                      "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "matmul_flop_per_s": peak, "config": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
