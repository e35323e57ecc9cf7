"""Pure decode time per token at batch 1: one prompt, 8 and then 40 new tokens, the difference / 32.

Subtracting the short run removes prefill and the first steps, so the figure is what one more
decode step costs (wall and process CPU time). A quick side-by-side tool for engine changes:
run it for the old and the new code in turn (new / old / new) on a quiet machine.

    .venv/bin/python benchmarks/decode_time.py --dtype bfloat16 --compile --threads 2
    .venv/bin/python benchmarks/decode_time.py --quantization int4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from recursa import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: the model's; bf16 with a quantization)")
    ap.add_argument("--quantization", default=None, choices=("int8", "int4"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, compile=args.compile)
    t0 = time.perf_counter()
    llm.generate(["The history of the city"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    warm = time.perf_counter() - t0
    runs = []
    for n in (8, 40):
        c, w = time.process_time(), time.perf_counter()
        out = llm.generate(["Once upon a time in a land far away"],
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        runs.append((time.process_time() - c, time.perf_counter() - w))
    cpu, wall = ((b - a) / 32 for a, b in zip(runs[0], runs[1]))
    print(f"decode: {wall * 1e3:.1f} ms/token wall, {cpu * 1e3:.1f} ms CPU ({args.threads} threads; warm-up {warm:.0f} s)")
    print(json.dumps({"dtype": args.dtype, "quantization": args.quantization, "compile": args.compile,
                      "threads": args.threads, "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3, "warmup_s": warm,
                      "last_tokens": out[0].token_ids[-5:]}))


if __name__ == "__main__":
    main()
