"""Where a decode step's time goes: model math vs engine Python and bookkeeping.

Decodes SmolLM2-135M (or --model) greedily at batch 1 and at --batch concurrent requests and splits
each engine step's wall time into
  layers   time inside the layer forwards of the span (projections, attention over the paged cache,
           MLP: the model's own work, its eager dispatch included),
  head     the final norm + LM head,
  engine   everything else: scheduling, the policy, batch metadata, routing, sampling, output
           processing (what the engine adds around the model).
It also counts aten ops dispatched per decode step (a machine-independent measure of eager
overhead). Prints a table, then one JSON line.

    .venv/bin/python benchmarks/engine_overhead.py --threads 2
    .venv/bin/python benchmarks/engine_overhead.py --quantization int4 --threads 2
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def measure(llm, prompts, new_tokens: int) -> dict:
    from recursa import SamplingParams

    runner, clock = llm.runner, {"layers": 0.0, "head": 0.0}
    span, head = runner.run_span, runner.run_head

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            clock[name] += time.perf_counter() - t
            return out
        return run

    runner.run_span, runner.run_head = timed("layers", span), timed("head", head)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        llm.add_request(f"r{i}", p, params)
    while any(s.num_cached < s.num_tokens - 1 or not s.output_token_ids for s in llm.scheduler.running) \
            or llm.scheduler.waiting:   # prefill first: time decode steps only
        llm.step()
    clock.update(layers=0.0, head=0.0)
    steps, tokens, wall = 0, 0, 0.0
    while llm.has_unfinished():
        t = time.perf_counter()
        outs = llm.step()
        wall += time.perf_counter() - t
        steps, tokens = steps + 1, tokens + len(outs)
    runner.run_span, runner.run_head = span, head
    engine = wall - clock["layers"] - clock["head"]
    return {"steps": steps, "tokens": tokens, "tok_s": tokens / wall, "ms_per_step": 1e3 * wall / steps,
            "layers_share": clock["layers"] / wall, "head_share": clock["head"] / wall, "engine_share": engine / wall}


def ops_per_step(llm, prompt) -> int:
    from recursa import SamplingParams

    llm.add_request("ops", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    llm.step()
    llm.step()
    with _CountOps() as c:
        llm.step()
    while llm.has_unfinished():
        llm.step()
    return c.n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import recursa

    llm = recursa.LLM(args.model, dtype=args.dtype, quantization=args.quantization, max_num_seqs=max(args.batch, 1),
                      compile=args.compile)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(8, 48))] for _ in range(args.batch)]
    measure(llm, prompts[:1], 4)   # warm-up
    rows = {"batch 1": measure(llm, prompts[:1], args.new_tokens),
            f"batch {args.batch}": measure(llm, prompts, args.new_tokens)}
    n_ops = ops_per_step(llm, prompts[0])
    print(f"{'load':10s} {'tok/s':>8s} {'ms/step':>8s} {'layers':>7s} {'head':>6s} {'engine':>7s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['tok_s']:8.1f} {r['ms_per_step']:8.1f} {r['layers_share']:7.1%} {r['head_share']:6.1%} "
              f"{r['engine_share']:7.1%}")
    print(f"aten ops per batch-1 decode step: {n_ops}  (threads {torch.get_num_threads()})")
    print(json.dumps({"model": args.model, "dtype": args.dtype, "quantization": args.quantization,
                      "threads": torch.get_num_threads(), "ops_per_step": n_ops, "rows": rows}))


if __name__ == "__main__":
    main()
