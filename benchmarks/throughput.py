"""Serving throughput: recursa's engine vs HuggingFace `generate`, depth-wise vs synchronous.

Same weights on both sides (the recursa model exported with `recursa.convert.hf.to_hf` and
loaded by transformers' AutoModelForCausalLM), greedy, every request producing exactly
--new-tokens tokens. Two loads: one request at a time (batch 1, --single-requests requests in
turn) and --concurrency requests submitted together. For each run: output tokens/s,
requests/s, TTFT and TPOT (p50/p99; TPOT = (E2E - TTFT) / (n_out - 1)), mean tokens per stage
run (recursa), KV bytes per token, whether the greedy tokens equal transformers', and the CPU
share (process CPU time / wall time: under --threads means the run waited for a core). Prints a
table, then a roofline table (benchmarks/roofline.py: the machine's memory bandwidth and matmul
peak, measured at the start of the run with the same threads; batch-1 decode as a fraction of
the bandwidth, concurrent decode as a fraction of the matmul peak), then one JSON line with the
configuration, the roofline numbers and the git revision.

    .venv/bin/python benchmarks/throughput.py                                # SmolLM2-135M, 64 new tokens
    .venv/bin/python benchmarks/throughput.py --new-tokens 16 --concurrency 8 --single-requests 1   # quick

--threads sets torch's intra-op threads for both sides (default 1: on a small shared machine,
more threads than free cores slows matmuls down by 10-100x).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the ocean", "a small town", "machine learning", "the history of Rome", "cooking pasta", "the moon",
          "a lost dog", "winter mornings", "the stock market", "ancient Egypt", "jazz music", "a mountain hike",
          "electric cars", "the human heart", "old libraries", "a rainy city"]
TEMPLATES = ["Write a short story about {}.", "Here is what I know about {}:", "Explain {} to a child. {} is"]


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        out.append(TEMPLATES[(i // len(TOPICS) + i) % len(TEMPLATES)].format(topic, topic.capitalize()))
    return out


def summarize(name: str, start: float, end: float, token_times: list[list[float]], starts: list[float]) -> dict:
    """token_times[r]: wall time of each output token of request r; starts[r]: its submission time."""
    ttft = np.array([t[0] - s for t, s in zip(token_times, starts)])
    tpot = np.array([(t[-1] - t[0]) / (len(t) - 1) for t in token_times if len(t) > 1])
    n_out = sum(len(t) for t in token_times)
    return {
        "run": name, "requests": len(token_times), "output_tokens": n_out, "seconds": round(end - start, 3),
        "output_tok_s": n_out / (end - start), "requests_s": len(token_times) / (end - start),
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        "tpot_p50_ms": 1e3 * float(np.percentile(tpot, 50)), "tpot_p99_ms": 1e3 * float(np.percentile(tpot, 99)),
    }


# ---- HuggingFace ------------------------------------------------------------------------------
class _Clock:
    """A logits processor that only records when each decoding step's logits are ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def run_hf(hf, batches: list[list[list[int]]], lengths: list[list[int]], name: str) -> tuple[dict, list[list[int]]]:
    """Each batch is generated with one left-padded `generate` call, batches one after another.

    A batch runs until its longest request is done (static batching); shorter requests keep
    their first `lengths` tokens, and only those count as output.
    """
    from transformers import LogitsProcessorList

    token_times, starts, outputs = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for batch, lens in zip(batches, lengths):
        new_tokens = max(lens)
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        clock, t0 = _Clock(), time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                          logits_processor=LogitsProcessorList([clock]))
        # the clock fires before each token is chosen; the last token is ready when generate returns
        times = clock.times[1:] + [time.perf_counter()]
        for row, n in zip(out[:, width:].tolist(), lens):
            outputs.append(row[:n])
            token_times.append(times[:n])
            starts.append(t0)
    res = summarize(name, start, time.perf_counter(), token_times, starts)
    res["decode_tok_s"] = roofline.decode_rate(token_times)
    res["cpu_share"] = (time.process_time() - cpu) / (time.perf_counter() - start)
    return res, outputs


# ---- recursa ----------------------------------------------------------------------------------
def run_recursa(model, batches: list[list[list[int]]], lengths: list[list[int]], name: str, **engine_args):
    """Each batch's requests are submitted together; the engine runs them to completion."""
    from recursa import LLM, SamplingParams

    llm = LLM(model, **engine_args)
    token_times, starts, outputs = [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for batch, lens in zip(batches, lengths):
        times = {str(i): [] for i in range(len(batch))}
        final = {}
        t0 = time.perf_counter()
        for i, (p, n) in enumerate(zip(batch, lens)):
            llm.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        while llm.has_unfinished():
            for out in llm.step():
                now = time.perf_counter()
                times[out.request_id] += [now] * len(out.delta_token_ids)
                if out.finished:
                    final[out.request_id] = out.token_ids
        for i in range(len(batch)):
            token_times.append(times[str(i)])
            starts.append(t0)
            outputs.append(final[str(i)])
    res = summarize(name, start, time.perf_counter(), token_times, starts)
    res["decode_tok_s"] = roofline.decode_rate(token_times)
    res["cpu_share"] = (time.process_time() - cpu) / (time.perf_counter() - start)
    stats = llm.stats()
    res["tokens_per_stage_run"] = stats["tokens_per_stage_run"]
    res["kv_bytes_per_token"] = stats["kv_bytes_per_token"]
    return res, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--single-requests", type=int, default=2, help="requests run one at a time for batch 1")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-hf", action="store_true", help="recursa only (no transformers needed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the machine's ceilings, first, while nothing of this run is in memory
    ceilings = roofline.Ceilings.measure(args.threads)
    print(f"  memory bandwidth {ceilings.bandwidth / 1e9:.1f} GB/s, matmul peak {ceilings.matmul / 1e9:.1f} GFLOP/s",
          file=sys.stderr)

    from recursa.data.tokenizer import load_tokenizer
    from recursa.model import load

    model = load(args.model)
    tok = load_tokenizer(args.model)
    ids = [tok.encode(p) for p in prompts(max(args.concurrency, args.single_requests))]
    n, c = args.new_tokens, args.concurrency
    loads = {  # name: (batches, output lengths)
        "batch 1": ([[p] for p in ids[:args.single_requests]], [[n]] * args.single_requests),
        f"{c} concurrent": ([ids[:c]], [[n] * c]),
        # lengths spread over n/8..n: static batching waits for the longest, continuous batching does not
        f"{c} concurrent, mixed lengths": ([ids[:c]], [[max(1, n * (1 + i % 8) // 8) for i in range(c)]]),
    }
    cfg = model.cfg
    kv_per_token = 2 * cfg.n_kv_heads * cfg.head_dim * model.embed_tokens.weight.element_size() * model.depth
    kv_memory = (args.concurrency * (max(map(len, ids)) + args.new_tokens) + 64) * kv_per_token * 2
    engine = dict(max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=kv_memory)

    rows, tokens = [], {}
    hf = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        from recursa.convert.hf import to_hf

        with tempfile.TemporaryDirectory() as tmp:
            to_hf(model, Path(tmp) / "hf")
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
        run_hf(hf, [ids[:2]], [[2, 2]], "warm-up")
    # recursa loads the directory itself: LLM(path) prepares the model for inference (fused
    # projections, packed CPU matmuls); a Decoder passed in as it is keeps plain nn.Linear layers
    run_recursa(args.model, [ids[:2]], [[2, 2]], "warm-up", **engine)
    for load_name, (batches, lengths) in loads.items():
        ctx = roofline.mean_context(batches, lengths)
        if hf is not None:
            res, out = run_hf(hf, batches, lengths, f"hf generate, {load_name}")
            res["kv_bytes_per_token"] = kv_per_token
            res["roofline"] = roofline.roofline(model, ctx, res["decode_tok_s"], ceilings, res["cpu_share"])
            rows.append(res)
            tokens[("hf", load_name)] = out
            print(f"  {res['run']}: {res['output_tok_s']:.1f} tok/s", file=sys.stderr)
        for policy in ("depthwise", "synchronous"):
            res, out = run_recursa(args.model, batches, lengths, f"recursa {policy}, {load_name}",
                                   policy=policy, **engine)
            if hf is not None:
                ref = tokens[("hf", load_name)]
                res["same_tokens_as_hf"] = sum(a == b for a, b in zip(out, ref)) / len(ref)
            res["roofline"] = roofline.roofline(model, ctx, res["decode_tok_s"], ceilings, res["cpu_share"])
            rows.append(res)
            print(f"  {res['run']}: {res['output_tok_s']:.1f} tok/s", file=sys.stderr)

    header = ["run", "tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "tok/stage", "KV B/tok", "=HF"]
    print(f"{header[0]:<50}" + "".join(f"{h:>10}" for h in header[1:]))
    for r in rows:
        cells = [f"{r['output_tok_s']:.1f}", f"{r['requests_s']:.2f}", f"{r['ttft_p50_ms']:.0f}ms",
                 f"{r['ttft_p99_ms']:.0f}ms", f"{r['tpot_p50_ms']:.1f}ms", f"{r['tpot_p99_ms']:.1f}ms",
                 f"{r.get('tokens_per_stage_run', float('nan')):.1f}", f"{r['kv_bytes_per_token']}",
                 f"{r['same_tokens_as_hf']:.0%}" if "same_tokens_as_hf" in r else "-"]
        print(f"{r['run']:<50}" + "".join(f"{c:>10}" for c in cells))
    ratios = {}
    for load_name in loads:
        by = {r["run"]: r["output_tok_s"] for r in rows}
        if f"hf generate, {load_name}" in by:
            ratios[load_name] = by[f"recursa depthwise, {load_name}"] / by[f"hf generate, {load_name}"]
    for k, v in ratios.items():
        print(f"recursa depthwise / hf generate, {k}: {v:.2f}x")
    # roofline of the equal-length loads (mixed lengths decode at a shrinking batch: no one ceiling)
    roof = [dict(run=r["run"], batch1=r["run"].endswith("batch 1"), **r["roofline"])
            for r in rows if r["run"].endswith(("batch 1", f"{c} concurrent"))]
    print(roofline.format_table(roof, ceilings))
    by_run = {r["run"]: r["roofline"] for r in rows}
    one, many = by_run["recursa depthwise, batch 1"], by_run[f"recursa depthwise, {c} concurrent"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = None
    print(json.dumps({
        "benchmark": "throughput", "git": rev, "model": args.model, "new_tokens": args.new_tokens,
        "concurrency": args.concurrency, "single_requests": args.single_requests, "threads": args.threads,
        "max_num_batched_tokens": args.max_num_batched_tokens, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "speedup_vs_hf": ratios,
        "roofline": {
            "bandwidth_bytes_s": ceilings.bandwidth, "matmul_flop_s": ceilings.matmul,
            "bandwidth_bytes_per_cpu_s": ceilings.bandwidth_cpu, "matmul_flop_per_cpu_s": ceilings.matmul_cpu,
            "batch1_bandwidth_fraction": one["bandwidth_fraction"],
            "batch1_bandwidth_fraction_cpu": one["bandwidth_fraction_cpu"],
            f"concurrent_{c}_flop_fraction": many["flop_fraction"],
            f"concurrent_{c}_flop_fraction_cpu": many["flop_fraction_cpu"]},
        "runs": rows,
    }))


if __name__ == "__main__":
    main()
