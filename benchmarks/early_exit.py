"""Early exit in the engine against full-depth greedy decoding on the same prompts, in one run.

For a model with exits (config `exit_depths`, from `recursa train --exit-depths`), the prompts
are decoded greedily by the engine (`recursa.LLM`) at full depth, then with an exit policy for
every KV strategy (`exit_strategy`: parallel, copy, speculative) x threshold policy, each at
batch 1 (one request after the other) and with `--concurrency` requests at once (the prompts
repeated to fill it; continuous batching). Per config:

- speed: wall-clock new tokens/s, and its ratio to full depth at the same concurrency timed right
  before it (paired: the load of a shared machine drifts over a run; `full tok/s` is that run),
  the median over `--repeats` such pairs;
- depth: mean depth the emitted tokens were predicted from, token-layer forwards per decoded
  token (the engine's stage_tokens after prefill, over the tokens after each request's first:
  catch-up, verification and rejected drafts included; full depth is exactly n_layers; parallel
  decoding's last stacked tokens never catch up, so it reads slightly low), copy's K/V-only
  projections per decoded token (`kv/tok`, a fraction of a layer each, apart), and LM-head
  evaluations per output token (`head/tok`: an exit check with a logit measure costs one);
- quality: share of tokens equal to full-depth greedy at the same index (strict: a divergence
  changes everything after it), and the perplexity of the continuation under the full model;
- speculative: drafts accepted / proposed.

The threshold policies: fixed at two values, CALM's decaying threshold, and FREE's adaptive
Beta-mixture estimator (ζ = target agreement), one mixture per exit depth, online: one instance
per strategy x concurrency learns across the prompts. `--measure classifier` uses the model's
learned exit classifier (`recursa train-exit-classifier`).

    python benchmarks/early_exit.py --model runs/demo-exits/model --threads 1 --fixed 0.2,0.1
    python benchmarks/early_exit.py --model runs/smol-exits/model --strategies parallel --fixed 0.8 --concurrency 16

`--target-agreement 0.8,0.9,0.95 --calibration-data DIR` replaces the threshold policies by calibrated
ones (recursa.engine.calibration): per target, the fixed threshold chosen on greedy continuations of
the corpus' val windows (Clopper-Pearson bound at confidence 1 - `--delta`), its agreement on a
disjoint held-out set of windows (replay), then the same speed/quality columns; `tok agree` is the
share of emitted tokens equal to the full model's greedy choice on the emitted prefix (the quantity
calibrated; `agree` is strict, index by index against full-depth text).

    python benchmarks/early_exit.py --model runs/demo-exits/model --threads 1 --target-agreement 0.8,0.9,0.95 \
        --calibration-data data/corpus --measure saturation --repeats 3 --json-out out/sat.json
    python benchmarks/early_exit.py --pareto out/pareto.png --pareto-from out/sat.json,out/maxprob.json

`--pareto PNG` saves speedup over full depth vs agreement with it, one marker per strategy x measure x
policy, one panel per concurrency, from this run and/or the JSON results named by `--pareto-from`.

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

from recursa import kernels

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village by the sea, there lived",
    "The main reasons why regular exercise improves health are",
]


@torch.inference_mode()
def continuation_nll(model, prompt: list[int], new: list[int]) -> tuple[float, int, int]:
    """Summed NLL of `new` given `prompt` under the full model, the token count, and how many of
    `new` are the full model's argmax on their own prefix."""
    ids = torch.tensor([prompt + new])
    logits = model(ids)[0, len(prompt) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(new), reduction="sum")
    return float(nll), len(new), int((logits.argmax(-1) == torch.tensor(new)).sum())


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


def calibrated_policies(args, model, measure):
    """(name, threshold factory or None for full depth, calibration) per --target-agreement."""
    from recursa.engine.calibration import calibrate_many
    from recursa.engine.thresholds import Fixed
    cals = calibrate_many(model, args.calibration_data, args.target_agreement, args.delta, measure,
                          sequences=args.calibration_sequences, source=args.calibration_source,
                          unit=args.calibration_unit,
                          log=lambda line: print("  " + line, flush=True))
    return [(f"target {cal.target:g}", None if cal.threshold is None else (lambda v=cal.threshold: Fixed(v)), cal)
            for cal in cals]


PARETO_AXES = (("agree", 100, "agreement with full-depth text, index by index (%)"),
               ("tok_agree", 100, "tokens equal to the full model's choice on their prefix (%)"),
               ("ppl", 1, "perplexity of the emitted text under the full model"))


def pareto_plot(results: list[dict], path: str) -> None:
    """Speedup over full depth vs quality (a row per measure of quality): a marker per strategy x
    confidence measure x policy, a column per concurrency (results: JSON documents of this benchmark)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = sorted({r["concurrency"] for res in results for r in res["rows"]})
    fig, axes = plt.subplots(len(PARETO_AXES), len(concs), figsize=(6.5 * len(concs), 4.5 * len(PARETO_AXES)),
                             squeeze=False)
    markers = {"copy": "s", "parallel": "o", "speculative": "^"}
    colors = {"max_prob": "C0", "saturation": "C1"}
    for row, (key, scale, label) in zip(axes, PARETO_AXES):
        for ax, conc in zip(row, concs):
            for res in results:
                color = colors.get(res["config"]["measure"], "C2")
                for r in res["rows"]:
                    if r["concurrency"] != conc or key not in r:
                        continue
                    x, y = r[key] * scale, r["speedup"]
                    ax.scatter(x, y, marker=markers.get(r["strategy"], "*"), color="k" if r["strategy"] == "full" else color)
                    if r["strategy"] != "full":
                        ax.annotate(f"{r['strategy'][:4]} {r['policy']}", (x, y), fontsize=5)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.axhline(1.5, color="grey", lw=0.8, ls=":")   # issue 12's goals: 1.5x at >= 95% agreement
            if scale == 100:
                ax.axvline(95, color="grey", lw=0.8, ls=":")
            ax.set(title=f"{conc} request{'s' if conc > 1 else ''} at once", xlabel=label, ylabel="speedup over full depth (x)")
    handles = [plt.Line2D([], [], marker=m, ls="", color="k", label=s) for s, m in markers.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=f"measure {n}") for n, c in colors.items()]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"early exit: speed vs quality ({results[0].get('model', '')}; full depth at (100%, 1x))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"saved {path}")


def run(llm, prompts, params, concurrency: int):
    """Outputs (token lists) and seconds: one request after the other, or `concurrency` at once."""
    t = time.perf_counter()
    if concurrency == 1:
        outs = [llm.generate(pr, params)[0] for pr in prompts]
    else:
        outs = llm.generate(prompts, params)
    return [o.token_ids for o in outs], time.perf_counter() - t


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
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16],
                   help="requests at once, comma-separated (1: one after the other)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per config (each paired): the median ratio")
    p.add_argument("--threads", type=int, default=1)
    floats = lambda s: [float(x) for x in s.split(",")]   # noqa: E731
    p.add_argument("--target-agreement", type=floats, default=None,
                   help="calibrated thresholds for these agreement targets (comma-separated) instead of the policies")
    p.add_argument("--calibration-data", default="data/corpus", help="prepared corpus whose val split calibrates")
    p.add_argument("--delta", type=float, default=0.05, help="1 - confidence of the calibration bound")
    p.add_argument("--calibration-sequences", type=int, default=64, help="calibration (and held-out) sequences")
    p.add_argument("--calibration-source", default="greedy", choices=("greedy", "corpus"))
    p.add_argument("--calibration-unit", default="sequence", choices=("sequence", "token"),
                   help="the bound's trials (recursa.engine.exit_replay.choose_threshold)")
    p.add_argument("--json-out", help="also write the JSON result to this file")
    p.add_argument("--pareto", help="save the speed-vs-agreement plot (PNG) here")
    p.add_argument("--pareto-from", default="", help="JSON results of earlier runs to plot (comma-separated); "
                                                       "with --pareto and no --model run, only these")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.pareto and args.pareto_from and args.model == p.get_default("model"):
        pareto_plot([json.loads(open(f).read()) for f in args.pareto_from.split(",")], args.pareto)
        return

    from recursa.data.tokenizer import load_tokenizer
    from recursa.engine.exit_policy import ExitPolicy
    from recursa.model.exit_classifier import load_exit_classifier
    from recursa.engine.llm import LLM
    from recursa.engine.sampling_params import SamplingParams
    from recursa.model import load
    from recursa.model.quant import prepare
    from recursa.model.exits import ExitSpec

    # prepared for inference as an LLM given a directory prepares it (fused projections, the CPU
    # kernels' matmuls), once: every LLM below shares it
    model = prepare(load(args.model).eval())
    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise SystemExit(f"{args.model} has no exits (config exit_depths is empty)")
    tok = load_tokenizer(args.model)
    measure = load_exit_classifier(args.model, model) if args.measure == "classifier" else args.measure
    base = [tok.encode(t) for t in PROMPTS[:args.n_prompts]]
    L = model.depth
    greedy = SamplingParams(temperature=0, max_tokens=args.max_new, ignore_eos=True)
    engine_args = dict(max_num_batched_tokens=args.max_num_batched_tokens)

    def make(policy=None, strategy="parallel", seqs=1):
        return LLM(model, exit_policy=policy, exit_strategy=strategy if policy else "parallel", max_draft=args.max_draft, max_num_seqs=seqs,
                   **engine_args)

    # warm-up (first-call allocations, kernel selection) so the first timed config is not penalised
    make().generate(base[0], SamplingParams(temperature=0, max_tokens=4))
    calibrated = calibrated_policies(args, model, measure) if args.target_agreement else None
    policies = ([(n, f) for n, f, _ in calibrated] if calibrated else make_policies(args, args.max_new))
    rows = []
    for conc in args.concurrency:
        prompts = (base * -(-conc // len(base)))[:max(conc, len(base))] if conc > 1 else base
        full = make(seqs=conc)
        ref, full_s = run(full, prompts, greedy, conc)
        n_ref = sum(len(o) for o in ref)
        nll = sum(continuation_nll(model, pr, o)[0] for pr, o in zip(prompts, ref))
        full_tps = n_ref / full_s
        rows.append({"concurrency": conc, "strategy": "full", "policy": "-", "tok_s": full_tps, "speedup": 1.0,
                     "mean_depth": float(L), "layers_per_tok": float(L), "kv_per_tok": 0.0,
                     "head_per_tok": full.stats()["head_evals_per_token"], "agree": 1.0, "tok_agree": 1.0,
                     "ppl": math.exp(nll / n_ref), "seconds": full_s})
        n_prompt = sum(len(pr) for pr in prompts)
        for strategy in args.strategies.split(","):
            for name, make_threshold in policies:
                timings = []   # (seconds, paired full-depth seconds) per repeat; a fresh threshold each time
                for _ in range(args.repeats):
                    threshold = make_threshold() if make_threshold else None  # one instance across the prompts
                    llm = make(ExitPolicy(spec, measure, threshold) if threshold else None, strategy, conc)
                    _, paired_s = run(full, prompts, greedy, conc)   # full depth right before: the ratio's base
                    outs, secs = run(llm, prompts, greedy, conc)
                    timings.append((secs, paired_s))
                secs, paired_s = sorted(timings, key=lambda t: t[0] / t[1])[len(timings) // 2]   # the median ratio
                st = llm.stats()
                n = sum(len(o) for o in outs)
                decoded = n - len(outs)
                same, total = map(sum, zip(*(agreement(o, r) for o, r in zip(outs, ref))))
                nll, _, tok_same = map(sum, zip(*(continuation_nll(model, pr, o) for pr, o in zip(prompts, outs))))
                depths = st.get("mean_exit_depth", float(L))
                row = {"concurrency": conc, "strategy": strategy, "policy": name, "tok_s": n / secs,
                       "speedup": (n / secs) / (n_ref / paired_s), "full_tok_s": n_ref / paired_s, "mean_depth": depths,
                       "layers_per_tok": (st["stage_tokens"] - n_prompt * L) / decoded,
                       "kv_per_tok": st.get("copied_kv_layer_tokens", 0) / decoded,
                       "head_per_tok": st["head_evals_per_token"], "agree": same / total, "ppl": math.exp(nll / n),
                       "tok_agree": tok_same / n, "seconds": secs}
                if calibrated:
                    cal = next(c for pn, _, c in calibrated if pn == name)
                    row.update(threshold=cal.threshold, bound=cal.bound, cal_agree=cal.calibration["agree"],
                               heldout_agree=cal.test["agree"], heldout_depth=cal.test["mean_depth"])
                if strategy == "speculative" and "draft_tokens" in st:
                    row["accepted"] = f"{st['accepted_draft_tokens']}/{st['draft_tokens']}"
                if hasattr(threshold, "by_depth"):  # FREE: the threshold each exit's estimator ended at
                    row["final_threshold"] = {d: t.value() for d, t in sorted(threshold.by_depth.items())}
                rows.append(row)
                print(f"  done {strategy} / {name} / {conc} at once in {secs:.1f}s", flush=True)

    print(f"\nmodel {args.model}: {L} layers, exits {list(spec.depths)} (own_norm={spec.own_norm}), "
          f"{len(base)} prompts x {args.max_new} new tokens, greedy, measure {args.measure}, threads {args.threads}, "
          f"CPU kernels: {kernels.status()}")
    hdr = (f"{'conc':>4}  {'strategy':<12}{'policy':<20}{'tok/s':>7}{'full':>7}{'x full':>8}{'depth':>7}{'lay/tok':>8}"
           f"{'kv/tok':>7}{'head/tok':>9}{'agree':>7}{'tok agr':>8}{'ppl':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        extra = f" acc {r['accepted']}" if "accepted" in r else ""
        if r.get("threshold") is not None:
            extra += f" thr {r['threshold']:.4f} bound {r['bound']:.4f} held-out {r['heldout_agree']:.1%}"
        elif "heldout_agree" in r:
            extra += " thr none (full depth)"
        if "final_threshold" in r:
            extra += " thr " + " ".join(f"{d}:{t:.3f}" for d, t in r["final_threshold"].items())
        print(f"{r['concurrency']:>4}  {r['strategy']:<12}{r['policy']:<20}{r['tok_s']:7.1f}"
              f"{r.get('full_tok_s', r['tok_s']):7.1f}{r['speedup']:8.2f}"
              f"{r['mean_depth']:7.2f}{r['layers_per_tok']:8.2f}{r['kv_per_tok']:7.2f}{r['head_per_tok']:9.2f}"
              f"{r['agree']:7.1%}{r['tok_agree']:8.1%}{r['ppl']:8.2f}{extra}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "early_exit", "config": vars(args), "model": args.model, "n_layers": L,
              "exit_depths": list(spec.depths), "own_norm": spec.own_norm, "rows": rows, "commit": commit,
              "torch": torch.__version__, "machine": platform.machine(),
              "cpu_kernels": kernels.status()}
    line = json.dumps(result, default=str)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    if args.pareto:
        pareto_plot([result] + [json.loads(open(f).read()) for f in filter(None, args.pareto_from.split(","))],
                    args.pareto)
    print(line)


if __name__ == "__main__":
    main()
