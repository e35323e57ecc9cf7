"""Recursion-wise KV memory of a Mixture-of-Recursions model: bytes reserved vs written, and how
many requests a fixed KV budget runs at once.

All requests are submitted at once to one engine whose KV budget holds --kv-requests requests at
their final length *at every depth* (what a dense cache reserves); the engine admits what fits and
preempts when full. Per run: the most requests that run at once with no preemption at all (the
first N prompts submitted together, N = 1, 2, ..), then for all of them: the most and the mean
requests holding KV at once, preemptions,
output tok/s, KV bytes per token reserved (blocks handed out, tails included) and written, and the
shared block's reserved / written share of its dense size next to the paper's (Nr+1)/(2Nr) (its
capacity schedule). `--baseline-src DIR` also runs the same measurement on another checkout's
engine (e.g. one whose recursion-wise cache reserves every depth), as a second row.

    .venv/bin/python benchmarks/mor_kv.py --model runs/demo-mor/model --requests 64 --kv-requests 8 \
        --baseline-src /work/main/src
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import prompts  # noqa: E402


def run_all(llm, ids, new_tokens) -> tuple[list[int], float]:
    """Submit every prompt at once and run to the end: (requests holding KV after each step, seconds)."""
    from recursa import SamplingParams

    for i, p in enumerate(ids):
        llm.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    running, start = [], time.perf_counter()
    while llm.has_unfinished():
        llm.step()
        running.append(len(llm.scheduler.running))
    return running, time.perf_counter() - start


def max_without_preemption(model, ids, args, budget) -> int:
    """The most requests (the first N prompts, all at once) that run to the end with no preemption."""
    from recursa import LLM

    best = 0
    for n in range(1, len(ids) + 1):
        llm = LLM(model, block_size=args.block_size, kv_cache_memory=budget, max_num_seqs=n,
                  max_num_batched_tokens=args.max_num_batched_tokens)
        run_all(llm, ids[:n], args.new_tokens)
        if llm.stats()["preemptions"]:
            return best
        best = n
    return best


def measure(args) -> dict:
    from recursa import LLM
    from recursa.data.tokenizer import load_tokenizer
    from recursa.model import load

    model = load(args.model)
    ids = [load_tokenizer(args.model).encode(p) for p in prompts(args.requests)]
    probe = LLM(model, block_size=args.block_size, kv_cache_memory=2**24)
    per_token, bs = probe.kv.kv_bytes_per_token, args.block_size   # every depth
    longest = max(len(p) for p in ids) + args.new_tokens
    budget = args.kv_requests * -(-longest // bs) * bs * per_token
    llm = LLM(model, block_size=bs, kv_cache_memory=budget, max_num_seqs=args.requests,
              max_num_batched_tokens=args.max_num_batched_tokens)
    running, seconds = run_all(llm, ids, args.new_tokens)
    st, kv = llm.stats(), llm.kv
    positions = getattr(kv, "num_positions", 0) or sum(len(p) + args.new_tokens - 1 for p in ids)
    row = dict(engine=args.label, kv_budget_bytes=budget, dense_bytes_per_token=per_token,
               dense_capacity=args.kv_requests, peak_running=max(running), mean_running=sum(running) / len(running),
               preemptions=st["preemptions"], output_tok_s=st["output_tokens"] / seconds, seconds=round(seconds, 2),
               kv_reserved_bytes_per_token=st.get("kv_reserved_bytes_per_token", per_token),
               kv_written_bytes_per_token=kv.entries_written * kv.entry_bytes / positions,
               mean_exit_depth=st["mean_exit_depth"], block_size=bs,
               max_without_preemption=max_without_preemption(model, ids, args, budget))
    st_model = model.structure()
    n_steps, k = st_model.n_loops, len(st_model.shared_layers)
    row["paper_shared_fraction"] = (n_steps + 1) / (2 * n_steps)
    if hasattr(kv, "region_entries"):   # compact tables: the shared block's share of its dense size
        dense_shared = positions * n_steps * k * kv.entry_bytes
        row["shared_written_fraction"] = sum(kv.region_entries[1:]) * k * kv.entry_bytes / dense_shared
        row["shared_reserved_fraction"] = sum(kv.region_reserved[1:]) / dense_shared
        row["step_fractions"] = [e / positions for e in kv.region_entries[1:]]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Mixture-of-Recursions model directory (mor_kv recursion)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-requests", type=int, default=8, help="KV budget: this many requests at every depth")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--baseline-src", default=None, help="also run with this checkout's src/ (a second row)")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(args)]
    if args.baseline_src:
        cmd = [sys.executable, __file__, "--json-only", "--label", f"baseline {args.baseline_src}"] + [
            a for a in sys.argv[1:] if a not in ("--baseline-src", args.baseline_src)]
        env = dict(os.environ, PYTHONPATH=args.baseline_src)
        rows.append(json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout))
    if args.json_only:
        print(json.dumps(rows[0]))
        return
    print(f"{'engine':<34} {'no-preempt max':>14} {'peak':>5} {'mean':>6} {'preempt':>7} {'tok/s':>7} {'reserved B/tok':>14} "
          f"{'written B/tok':>13} {'shared res/wr/paper':>20}")
    for r in rows:
        shared = (f"{r['shared_reserved_fraction']:.3f}/{r['shared_written_fraction']:.3f}/{r['paper_shared_fraction']:.3f}"
                  if "shared_written_fraction" in r else f"-/-/{r['paper_shared_fraction']:.3f}")
        print(f"{r['engine'][:34]:<34} {r['max_without_preemption']:>14} {r['peak_running']:>5} {r['mean_running']:>6.1f} {r['preemptions']:>7} "
              f"{r['output_tok_s']:>7.1f} {r['kv_reserved_bytes_per_token']:>14.0f} {r['kv_written_bytes_per_token']:>13.0f} "
              f"{shared:>20}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
