"""Validation loss vs served throughput: vanilla models of several depths, recursive models and
Mixture-of-Recursions models trained at equal training FLOPs, then served by the same engine in
the same run (issue 13, item 2: "an MoR model at equal or better validation loss than a vanilla
model is served >= 1.3x faster than it").

Training is benchmarks/mor_isoflop.py's (`run_one`: same corpus, width and budget; every config
gets the FLOPs the 8-layer vanilla model spends on --budget-tokens tokens). A config whose trained
model already exists under --out is not trained again, so an interrupted run resumes where it
stopped. Serving: every model through `recursa.LLM` (continuous depth-wise batching, the default
policy), --concurrency requests at once (prompts: the first tokens of val windows), greedy,
exactly --new-tokens tokens each; the models take turns, --repeats rounds, median tokens/s (the
load of a shared machine drifts: turns keep the comparison fair). The engine's stage runs and
tokens per run are printed beside the times. Saves the plot (val NLL vs tokens/s) as PNG.

    python benchmarks/mor_pareto.py --data data/corpus --out runs/mor_pareto --budget-tokens 300000 \\
        --configs vanilla-4,vanilla-6,vanilla,rec3,mor-ec3,mor-tc3 --threads 2 --concurrency 64

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mor_isoflop  # noqa: E402  (the training half)


def trained(args, names) -> list[dict]:
    """mor_isoflop rows for `names`: trained now, or read back from an earlier run of this script."""
    from recursa.train.data import data_vocab_size

    out, rows = Path(args.out), []
    vocab = data_vocab_size(Path(args.data))
    for name in names:
        saved = out / name / "row.json"
        if saved.is_file():
            rows.append(json.loads(saved.read_text()))
            continue
        if (out / name).exists():   # a run that stopped mid-training: start that config over
            import shutil
            shutil.rmtree(out / name)
        row = mor_isoflop.run_one(name, args, vocab, out, {}, None)
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(saved)
        rows.append(row)
        print(f"trained {name}: val NLL {row['val_nll']:.4f}", file=sys.stderr, flush=True)
    return rows


def serve(args, rows) -> None:
    """Adds served tokens/s (median of the rounds) and the engine's counters to each row."""
    from recursa import LLM, SamplingParams
    from recursa.data.packed import read_tokens

    val = read_tokens(args.data, "val")
    prompts = [[int(t) for t in val[i * 64: i * 64 + args.prompt_len]] for i in range(args.concurrency)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    engines = {r["model"]: LLM(str(Path(args.out) / r["model"] / "train" / "model"), max_num_seqs=args.concurrency)
               for r in rows}
    times = {name: [] for name in engines}
    for name, llm in engines.items():   # warm-up
        llm.generate(prompts[:4], params)
    for _ in range(args.repeats):
        for name, llm in engines.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            times[name].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
    for r in rows:   # the engine's counters over one more pass (the same work every pass: greedy, same prompts)
        llm = engines[r["model"]]
        before = llm.stats()
        llm.generate(prompts, params)
        after = llm.stats()
        runs, tokens = after["stage_runs"] - before["stage_runs"], after["stage_tokens"] - before["stage_tokens"]
        r.update(served_tok_s=statistics.median(times[r["model"]]), served_rounds=times[r["model"]],
                 stage_runs=runs, tokens_per_stage_run=tokens / max(runs, 1),
                 layer_tokens_per_output=tokens / (args.concurrency * args.new_tokens))


def plot(rows, path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        kind = "o" if r["model"].startswith("vanilla") else "s" if r["model"].startswith("rec") else "^"
        ax.scatter(r["served_tok_s"], r["val_nll"], marker=kind, s=40)
        ax.annotate(r["model"], (r["served_tok_s"], r["val_nll"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("served tokens/s (same engine, same run)")
    ax.set_ylabel("validation NLL (causal routing)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/corpus")
    p.add_argument("--out", default="runs/mor_pareto")
    p.add_argument("--configs", default="vanilla-4,vanilla-6,vanilla,rec3,mor-ec3,mor-tc3")
    mor_isoflop.add_training_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plot", default="benchmarks/mor_pareto.png")
    p.add_argument("--train-only", action="store_true", help="train what is missing, then stop (serve later, quiet)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in mor_isoflop.CONFIGS and n not in mor_isoflop.EXTRA]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}")
    rows = trained(args, names)
    if args.train_only:
        return
    serve(args, rows)
    print(f"{'model':12s} {'val NLL':>8s} {'tok/s':>8s} {'stage runs':>10s} {'tok/run':>8s} {'layer-tok/out':>13s}")
    for r in rows:
        print(f"{r['model']:12s} {r['val_nll']:8.4f} {r['served_tok_s']:8.1f} {r['stage_runs']:10d} "
              f"{r['tokens_per_stage_run']:8.1f} {r['layer_tokens_per_output']:13.2f}")
    if args.plot:
        plot(rows, args.plot, f"equal training FLOPs ({args.budget_tokens} vanilla tokens), "
                              f"{args.concurrency} concurrent, {args.threads} threads")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "mor_pareto", "config": vars(args), "rows": rows, "commit": commit,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
