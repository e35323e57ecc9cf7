"""Adaptive depth in serving: depth-wise continuous batching vs synchronous batching vs a vanilla model.

One run, same machine, same prompts, every request producing exactly --new-tokens tokens:
  vanilla      a vanilla model of the same width and depth (random weights: only its cost matters)
  depthwise    the adaptive model (Mixture-of-Recursions, or exits with --exit-threshold: the
               model's own exits, or the loop ends of a recursive model without any) under
               continuous depth-wise batching: tokens at any loop of a shared layer batch together
  fullest      the same, always running the stage with the most waiting tokens (the greedy rule)
  synchronous  the same model, a batch stepping through all depths together (exited tokens wait)

Per run: output tokens/s, requests/s, TTFT/TPOT p50/p99, mean executed depth per output token,
token-stage passes (every stage: layers, and each head or exit-head evaluation), stage runs and
tokens per stage run, KV bytes per token reserved and actually written. The *ideal* speedup is
vanilla passes / adaptive passes; *realised* is adaptive tok/s / vanilla tok/s; the goal
(issue 6) is realised >= 90% of ideal. --max-num-batched-tokens below the number of requests
makes the token budget bind (every run could be full: the regime of a GPU at its compute limit);
above it, a stage run costs about the same whatever its tokens. A PNG histogram of executed depth per output token with
--histogram. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/depthwise.py --model runs/demo-mor/model --vanilla runs/demo-small/model \
        --requests 128 --new-tokens 32 --max-num-batched-tokens 32 --histogram runs/demo-mor/depths.png
    .venv/bin/python benchmarks/depthwise.py --model runs/smol-exits/model --exit-threshold 0.9
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import prompts, summarize  # noqa: E402

from recursa import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(model, ids, new_tokens, name, **llm_args) -> tuple[dict, list[int]]:
    """All requests submitted at once, run to completion; (row, executed depth of every output token)."""
    from recursa import LLM, SamplingParams

    llm = LLM(model, **llm_args)
    llm.generate([ids[0]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))   # warm-up
    llm.runner.num_span_runs = llm.runner.num_stage_runs = llm.runner.num_stage_tokens = llm.runner.num_head_tokens = 0
    llm.kv.entries_written = llm.kv.num_positions = llm.kv.reserved_bytes = llm.num_output_tokens = llm.sum_exit_depth = 0
    times = {str(i): [] for i in range(len(ids))}
    depths: list[int] = []
    start = time.perf_counter()
    for i, p in enumerate(ids):
        llm.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    while llm.has_unfinished():
        for out in llm.step():
            times[out.request_id] += [time.perf_counter()] * len(out.delta_token_ids)
            if out.finished:
                depths += out.exit_depths
    row = summarize(name, start, time.perf_counter(), list(times.values()), [start] * len(ids))
    st = llm.stats()
    tokens = sum(len(p) for p in ids) + len(ids) * (new_tokens - 1)   # positions that entered the model
    row.update(mean_depth=sum(depths) / len(depths), stage_runs=st["stage_runs"],
               tokens_per_stage_run=st["tokens_per_stage_run"],
               passes=st["stage_tokens"] + st["head_tokens"], kv_reserved_bytes_per_token=st["kv_reserved_bytes_per_token"],
               kv_written_bytes_per_token=st["kv_entries_written"] * llm.kv.entry_bytes / tokens)
    return row, depths


def vanilla_like(model):
    """A vanilla decoder of the same width and depth (no sharing, routers or exits)."""
    from recursa.model import Decoder

    cfg = model.cfg.replace(n_layers=model.depth, sharing="none", n_loops=1, lora_rank_attn=0, lora_rank_mlp=0,
                            exit_depths=[], exit_own_norm=False, mor_router="none")
    torch.manual_seed(0)
    return Decoder(cfg).eval()


def save_histogram(depths: list[int], model_depth: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = Counter(depths)
    xs = list(range(1, model_depth + 1))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(xs, [counts.get(x, 0) / len(depths) for x in xs], color="#4277b5")
    ax.set_xlabel("executed depth (stage passes) per output token")
    ax.set_ylabel("share of tokens")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(xs)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="adaptive model directory (MoR, or with exits)")
    ap.add_argument("--vanilla", default=None, help="also serve this (trained) vanilla model directory, as a row")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--exit-measure", default="max_prob")
    ap.add_argument("--exit-threshold", type=float, default=None, help="early exit: fixed confidence threshold")
    ap.add_argument("--histogram", type=Path, default=None, help="PNG of executed depth per output token")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row, interleaved; the median is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="serve in this dtype (bf16, fp32; default: the model's own)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from recursa.data.tokenizer import load_tokenizer
    from recursa.engine.exit_policy import ExitPolicy
    from recursa.engine.thresholds import Fixed
    from recursa.model import load
    from recursa.model.exits import ExitSpec
    from recursa.model.quant import prepare

    # served as LLM(directory) serves a model: prepared for inference (fused projections, the CPU
    # kernels' matmuls, the decode span in one C call), every row alike
    model = prepare(load(args.model).eval(), args.dtype)
    dtype = model.embed_tokens.weight.dtype
    ids = [load_tokenizer(args.model).encode(p) for p in prompts(args.requests)]
    exit_policy = None
    if args.exit_threshold is not None:
        spec = ExitSpec.from_config(model.cfg)
        if not spec.depths and model.cfg.sharing in ("cycle", "middle_cycle"):   # recursive: exit at loop ends
            spec = ExitSpec(tuple(e + 1 for e in model.structure().loop_ends[:-1]))   # after the loop's last depth
        measure = args.exit_measure
        if measure == "classifier":   # the learned one (recursa train-exit-classifier), saved beside the model
            from recursa.model.exit_classifier import load_exit_classifier

            measure = load_exit_classifier(args.model, model)
        exit_policy = ExitPolicy(spec, measure, Fixed(args.exit_threshold))
    engine = dict(max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_memory=None, max_num_seqs=args.requests)
    configs = [("vanilla, same depth", prepare(vanilla_like(model), dtype), {})]
    if args.vanilla:
        configs.append((f"vanilla {Path(args.vanilla).parent.name}", prepare(load(args.vanilla).eval(), dtype), {}))
    configs += [(f"adaptive {policy}", model, dict(policy=policy, exit_policy=exit_policy))
                for policy in ("depthwise", "fullest", "synchronous")]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    depths = None
    for rep in range(args.repeats):   # interleaved, so that drifting machine load hits every row alike
        for name, m, extra in configs:
            row, d = run(m, ids, args.new_tokens, name, **extra, **engine)
            results[name].append(row)
            depths = depths or (d if name == "adaptive depthwise" else None)
            print(f"  [{rep + 1}/{args.repeats}] {name}: {row['output_tok_s']:.1f} tok/s", file=sys.stderr)
    rows = []
    for name, reps in results.items():   # the median run by tok/s stands for the row (all runs in the JSON)
        row = dict(sorted(reps, key=lambda r: r["output_tok_s"])[len(reps) // 2])
        row["tok_s_all"] = [round(r["output_tok_s"], 1) for r in reps]
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["ideal_speedup"] = base["passes"] / r["passes"]
        r["realised_speedup"] = r["output_tok_s"] / base["output_tok_s"]
        r["fraction_of_ideal"] = r["realised_speedup"] / r["ideal_speedup"]

    header = ["run", "tok/s", "TTFT p50", "TPOT p50", "depth", "passes", "runs", "tok/run", "KV B/tok", "ideal", "real",
              "%ideal"]
    print(f"{header[0]:<28}" + "".join(f"{h:>10}" for h in header[1:]))
    for r in rows:
        cells = [f"{r['output_tok_s']:.1f}", f"{r['ttft_p50_ms']:.0f}ms", f"{r['tpot_p50_ms']:.1f}ms",
                 f"{r['mean_depth']:.2f}", f"{r['passes']}", f"{r['stage_runs']}", f"{r['tokens_per_stage_run']:.1f}",
                 f"{r['kv_written_bytes_per_token']:.0f}", f"{r['ideal_speedup']:.2f}x",
                 f"{r['realised_speedup']:.2f}x", f"{r['fraction_of_ideal']:.0%}"]
        print(f"{r['run']:<28}" + "".join(f"{c:>10}" for c in cells))
    if args.histogram is not None and depths:
        save_histogram(depths, model.depth, args.histogram,
                       f"{Path(args.model).parent.name if Path(args.model).name == 'model' else Path(args.model).name}: mean depth {sum(depths) / len(depths):.2f} of {model.depth}")
        print(f"histogram: {args.histogram}")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "depthwise", "git": rev, "model": args.model, "requests": args.requests, "dtype": str(dtype),
                      "new_tokens": args.new_tokens, "threads": args.threads, "exit_threshold": args.exit_threshold,
                      "torch": torch.__version__,
                      "cpu_kernels": kernels.status(), "runs": rows}))


if __name__ == "__main__":
    main()
