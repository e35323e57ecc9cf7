"""Early-exit decoding against full-depth greedy decoding on the same prompts, in one run.

For a model with exits (config `exit_depths`, from `recursa train --exit-depths`), each prompt
is decoded greedily at full depth (the engine at batch 1), then by the early-exit
decoder (recursa.engine.early_exit) for every KV strategy x threshold policy. Per config:

- speed: wall-clock new tokens/s, and its ratio to full depth measured in this run;
- depth: mean depth the emitted tokens were predicted from, and token-layer forwards per decoded
  token (`layer_tokens`: every layer a token actually ran after prefill, K/V catch-up and
  speculative re-verification included, divided by the tokens after the first, which prefill
  emits; full depth is exactly n_layers), and for copy the K/V-only projections of skipped
  layers per decoded token (`kv/tok`, a small fraction of a layer each, counted apart);
- quality: share of tokens equal to full-depth greedy at the same index (up to the first
  divergence everything after is a different text, so this is a strict measure), and the
  perplexity of the generated continuation under the full model (lower = more natural to it).

The threshold policies: fixed at two values, CALM's decaying threshold, and FREE's adaptive
Beta-mixture estimator (ζ = target agreement), one mixture per exit depth. FREE's estimator is
online: one instance per strategy sees the prompts in order, so it learns across them (each exit
needs `min_samples` agreements and disagreements labelled by deep passes before it lets anything
exit there). `--measure classifier` uses the model's learned exit classifier
(`recursa train-exit-classifier`).

    python benchmarks/early_exit.py --model runs/smol-exits/model --threads 2
    python benchmarks/early_exit.py --model runs/smol-exits/model --strategies parallel --fixed 0.8
    python benchmarks/early_exit.py --model runs/smol-exits-lr1e-1/model --measure classifier --fixed 0.9,0.7

Prints a table, then one JSON line (config, rows, git commit).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time

import torch

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village by the sea, there lived",
    "The main reasons why regular exercise improves health are",
]


@torch.inference_mode()
def continuation_nll(model, prompt: list[int], new: list[int]) -> tuple[float, int]:
    """Summed NLL of `new` given `prompt` under the full model, and the token count."""
    ids = torch.tensor([prompt + new])
    logits = model(ids)[0, len(prompt) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(new), reduction="sum")
    return float(nll), len(new)


def agreement(a: list[int], ref: list[int]) -> tuple[int, int]:
    """Positions where `a` equals the reference (compared over the reference's length)."""
    return sum(x == y for x, y in zip(a, ref)), len(ref)


def make_policies(args, max_new: int):
    from recursa.engine.thresholds import BetaMixture, CALMDecay, Fixed, PerExit
    out = [(f"fixed {v:g}", lambda v=v: Fixed(v)) for v in args.fixed]
    out.append((f"calm {args.calm:g} tau{args.calm_tau:g}", lambda: CALMDecay(args.calm, args.calm_tau, max_new)))
    out.append((f"free zeta{args.free_zeta:g}", lambda: PerExit(BetaMixture(
        args.free_zeta, initial=args.free_initial, min_samples=args.free_min_samples))))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/smol-exits/model")
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--n-prompts", type=int, default=len(PROMPTS))
    p.add_argument("--strategies", default="copy,parallel,speculative")
    p.add_argument("--fixed", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 0.7],
                   help="fixed max-prob thresholds, comma-separated")
    p.add_argument("--calm", type=float, default=0.8, help="CALM decay base threshold λ")
    p.add_argument("--calm-tau", type=float, default=4.0)
    p.add_argument("--free-zeta", type=float, default=0.9, help="FREE target agreement probability")
    p.add_argument("--free-initial", type=float, default=1.0, help="FREE threshold before the estimator is fitted")
    p.add_argument("--free-min-samples", type=int, default=10)
    p.add_argument("--measure", default="max_prob", choices=("max_prob", "margin", "saturation", "classifier"))
    p.add_argument("--max-draft", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from recursa.data.tokenizer import load_tokenizer
    from recursa.engine.early_exit import early_exit_generate
    from recursa.engine.exit_policy import ExitPolicy
    from recursa.model.exit_classifier import load_exit_classifier
    from recursa.engine.llm import LLM
    from recursa.engine.sampling_params import SamplingParams
    from recursa.model import load
    from recursa.model.exits import ExitSpec

    model = load(args.model).eval()
    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise SystemExit(f"{args.model} has no exits (config exit_depths is empty)")
    tok = load_tokenizer(args.model)
    measure = load_exit_classifier(args.model, model) if args.measure == "classifier" else args.measure
    prompts = [tok.encode(t) for t in PROMPTS[:args.n_prompts]]
    L = model.depth

    # warm-up (first-call allocations, kernel selection) so the first timed config is not penalised
    full_depth = LLM(model, max_num_seqs=1)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_new, ignore_eos=True)
    full_depth.generate(prompts[0], SamplingParams(temperature=0, max_tokens=4))

    def run_full():   # the engine at batch 1, one request after the other
        t = time.perf_counter()
        outs = [full_depth.generate(pr, greedy)[0].token_ids for pr in prompts]
        return outs, time.perf_counter() - t

    ref, full_s = run_full()
    n_ref = sum(len(o) for o in ref)
    nll = sum(continuation_nll(model, pr, o)[0] for pr, o in zip(prompts, ref))
    full_tps = n_ref / full_s
    rows = [{"strategy": "full", "policy": "-", "tok_s": full_tps, "speedup": 1.0, "mean_depth": float(L),
             "layers_per_tok": float(L), "kv_per_tok": 0.0, "agree": 1.0, "ppl": math.exp(nll / n_ref), "shares": {L: 1.0},
             "seconds": full_s}]

    for strategy in args.strategies.split(","):
        for name, make in make_policies(args, args.max_new):
            threshold = make()  # one instance across the prompts (FREE learns online)
            policy = ExitPolicy(spec, measure, threshold)
            t = time.perf_counter()
            results = [early_exit_generate(model, pr, args.max_new, policy, strategy, max_draft=args.max_draft)
                       for pr in prompts]
            secs = time.perf_counter() - t
            n = sum(len(r.tokens) for r in results)
            depths = [d for r in results for d in r.exit_depths]
            same, total = map(sum, zip(*(agreement(r.tokens, o) for r, o in zip(results, ref))))
            nll = sum(continuation_nll(model, pr, r.tokens)[0] for pr, r in zip(prompts, results))
            row = {"strategy": strategy, "policy": name, "tok_s": n / secs, "speedup": (n / secs) / full_tps,
                   "mean_depth": sum(depths) / len(depths),
                   "layers_per_tok": sum(r.layer_tokens for r in results) / (n - len(results)),
                   "kv_per_tok": sum(r.kv_layer_tokens for r in results) / (n - len(results)),
                   "agree": same / total, "ppl": math.exp(nll / n),
                   "shares": {d: depths.count(d) / len(depths) for d in sorted(set(depths))}, "seconds": secs}
            if strategy == "speculative":
                row["accepted"] = f"{sum(r.accepted for r in results)}/{sum(r.drafted for r in results)}"
            if hasattr(threshold, "by_depth"):  # FREE: the threshold each exit's estimator ended at
                row["final_threshold"] = {d: t.value() for d, t in sorted(threshold.by_depth.items())}
            rows.append(row)
            print(f"  done {strategy} / {name} in {secs:.1f}s", flush=True)

    print(f"\nmodel {args.model}: {L} layers, exits {list(spec.depths)} (own_norm={spec.own_norm}), "
          f"{len(prompts)} prompts x {args.max_new} new tokens, greedy, measure {args.measure}, threads {args.threads}")
    hdr = (f"{'strategy':<12}{'policy':<20}{'tok/s':>7}{'x full':>8}{'depth':>7}{'lay/tok':>8}{'kv/tok':>7}"
           f"{'agree':>7}{'ppl':>8}  shares")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        shares = " ".join(f"{d}:{s:.0%}" for d, s in r["shares"].items())
        extra = f" acc {r['accepted']}" if "accepted" in r else ""
        if "final_threshold" in r:
            extra += " thr " + " ".join(f"{d}:{t:.3f}" for d, t in r["final_threshold"].items())
        print(f"{r['strategy']:<12}{r['policy']:<20}{r['tok_s']:7.1f}{r['speedup']:8.2f}{r['mean_depth']:7.1f}"
              f"{r['layers_per_tok']:8.1f}{r['kv_per_tok']:7.1f}{r['agree']:7.1%}{r['ppl']:8.2f}  {shares}{extra}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    config = {k: v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "early_exit", "config": config, "n_layers": L, "exit_depths": list(spec.depths),
                      "own_norm": spec.own_norm, "rows": rows, "commit": commit, "torch": torch.__version__,
                      "machine": platform.machine()}, default=str))


if __name__ == "__main__":
    main()
