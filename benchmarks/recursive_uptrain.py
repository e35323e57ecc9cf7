"""Recursive conversions before and after the same fixed uptraining budget: one command, whole sweep.

For every config SHARING:LOOPS:INIT:RANK (as in benchmarks/recursive.py) the original model is
converted in memory (recursa.convert.recursive.to_recursive) and measured (`measure` from
recursive.py: parameters, val perplexity, HellaSwag, LAMBADA), saved under <out>/<config>/
converted, uptrained with `recursa.train.train` for exactly --steps optimizer steps (the same seed,
so every config sees the same batches in the same order; optional forward-KL distillation from
the original model), then the uptrained model is measured the same way. The unconverted model is
measured once first. Each finished config appends one JSON line to <out>/results.jsonl, so a
killed sweep continues where it stopped (finished configs are skipped); the end prints a
markdown table and one JSON line with every row.

    python benchmarks/recursive_uptrain.py --out runs/rec-uptrain --steps 16 --threads 1
    python benchmarks/recursive_uptrain.py --configs cycle:3:stepwise:0 --steps 2 --hellaswag 5 \\
        --lambada 5 --max-tokens 1024 --out /tmp/rec-smoke                           # smoke test
    python benchmarks/recursive_uptrain.py --out runs/rec-uptrain --report          # table of what is done
    python benchmarks/recursive_uptrain.py --out runs/rec-asvd --hellaswag 0 --lambada 0 \
        --configs cycle:2:stepwise:0,cycle:2:stepwise:64,cycle:2:stepwise:64:asvd   # plain vs activation-aware

Only metrics stay by default: the converted weights and the trainer checkpoint of each config
are deleted once measured, the uptrained model is kept in <out>/<config>/run/model unless
--no-keep-model. Every timing runs on the threads given by --threads.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recursive import convert, format_row, header, load_tasks, measure, parse_config  # noqa: E402

# the paper's comparison first, the random baselines last (a sweep cut short keeps what matters)
DEFAULT_CONFIGS = ["cycle:3:stepwise:0", "cycle:3:average:0", "cycle:3:lower:0", "cycle:3:stepwise:64",
                   "cycle:2:stepwise:0", "cycle:2:average:0", "cycle:2:lower:0", "cycle:3:average:64",
                   "cycle:3:random:0", "cycle:2:random:0"]


def slug(spec: str) -> str:
    return spec.replace(":", "-")


def done_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["config"]: r for r in rows}


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def uptrain(spec: str, original, tokens, tok, tasks, args) -> dict:
    """Convert, measure, uptrain --steps steps, measure again: one result row."""
    from recursa.model import load
    from recursa.train import TrainConfig, train

    c = parse_config(spec)
    work = Path(args.out) / slug(spec)
    converted, run = work / "converted", work / "run"
    if run.exists():  # a run killed mid-way: start this config again from its conversion
        shutil.rmtree(run)
    model = convert(original, c, args)
    before = measure(model, tokens, tok, tasks, args)
    model.save(converted)
    del model
    cfg = TrainConfig(data=args.data, out=str(run), preset=None, init=str(converted), max_steps=args.steps,
                      seq_len=args.train_seq_len, batch_size=args.train_batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, seed=args.train_seed, eval_every=0, eval_batches=2,
                      log_every=1, progress=False,
                      distill_from=args.model if args.distill_weight > 0 else None,
                      distill_weight=args.distill_weight, loop_exit_weight=args.loop_exit_weight)
    t = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = metrics[0], [m for m in metrics if "loss" in m][-1]
    after = measure(load(run / "model"), tokens, tok, tasks, args)
    shutil.rmtree(converted)
    shutil.rmtree(run / "checkpoint", ignore_errors=True)
    if not args.keep_model:
        shutil.rmtree(run / "model")
    return {"config": spec, **c, "before": before, "after": after, "train_seconds": train_s,
            "train_steps": summary["step"], "train_loop_seconds": last["elapsed"], "train_tokens": summary["tokens"],
            "train_loss_first": first["loss"], "train_loss_last": last["loss"],
            "train_ce_last": last.get("ce"), "train_kl_last": last.get("distill_kl"),
            "trainer_val_loss": summary["val_loss"]}


def unigram_ppl(args) -> float:
    """Perplexity of the train split's token frequencies on the same val tokens: the bar to beat."""
    import math

    from recursa.data.packed import read_tokens
    from recursa.train.data import data_vocab_size, unigram_loss

    val = read_tokens(args.data, "val")
    n = len(val) if args.max_tokens is None else min(len(val), args.max_tokens + 1)
    return math.exp(unigram_loss(read_tokens(args.data, "train"), val[1:n], data_vocab_size(args.data)))


def markdown(rows: list[dict]) -> str:
    def cell(m: dict) -> str:
        hs = f"{m['hellaswag_acc_norm']:.2f}" if "hellaswag_acc_norm" in m else "-"
        lb = f"{m['lambada_acc']:.2f} / {m['lambada_bpb']:.2f}" if "lambada_acc" in m else "-"
        return f"{m['val_ppl']:.4g} | {hs} | {lb}"

    lines = ["| config | params | non-emb | before: val ppl | HS acc_norm | LAMBADA acc / bpb "
             "| after: val ppl | HS acc_norm | LAMBADA acc / bpb | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.get("before", r)
        after = f"{cell(r['after'])} | {r['train_seconds']:.0f}" if "after" in r else "| | |"
        lines.append(f"| {r['config']} | {b['params'] / 1e6:.1f}M | {b['params_non_emb'] / 1e6:.1f}M | "
                     f"{cell(b)} | {after} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m", help="original model (recursa dir) and KD teacher")
    p.add_argument("--data", default="data/corpus-smollm", help="prepared corpus (train: uptraining, val: perplexity)")
    p.add_argument("--out", default="runs/rec-uptrain")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    p.add_argument("--steps", type=int, default=16, help="uptraining optimizer steps per config (the fixed budget)")
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0: none)")
    p.add_argument("--train-seed", type=int, default=1337, help="data order (the same for every config)")
    p.add_argument("--distill-weight", type=float, default=1.0, help="KL(original || student) weight (0: plain CE)")
    p.add_argument("--loop-exit-weight", type=float, default=0.0, help="λ of the intermediate loop-end CE")
    p.add_argument("--max-tokens", type=int, default=8192, help="validation tokens for perplexity")
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window")
    p.add_argument("--batch-size", type=int, default=4, help="eval batch size")
    p.add_argument("--hellaswag", type=int, default=100, help="documents (0: skip)")
    p.add_argument("--lambada", type=int, default=100, help="documents (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of --init random")
    p.add_argument("--calib-tokens", type=int, default=8192, help="asvd configs: calibration tokens (train split)")
    p.add_argument("--no-keep-model", dest="keep_model", action="store_false", help="delete the uptrained weights")
    p.add_argument("--report", action="store_true", help="only print the table of <out>/results.jsonl (no runs)")
    args = p.parse_args()
    if args.report:
        done = done_rows(Path(args.out) / "results.jsonl")
        print(markdown([done[c] for c in ["original", *args.configs.split(",")] if c in done]))
        print(f"unigram (train token frequencies) val ppl on the same tokens: {unigram_ppl(args):.0f}")
        return
    torch.set_num_threads(args.threads)
    specs = args.configs.split(",")
    for spec in specs:
        parse_config(spec)

    from recursa.convert.recursive import load_source
    from recursa.data.packed import read_tokens
    from recursa.data.tokenizer import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = done_rows(results)
    original = load_source(args.model, dtype=torch.float32)
    tokens = read_tokens(args.data, "val")
    tok = load_tokenizer(args.model)
    tasks = load_tasks(args.hellaswag, args.lambada)
    print(header(), flush=True)
    if "original" not in done:
        done["original"] = {"config": "original", **measure(original, tokens, tok, tasks, args)}
        append_row(results, done["original"])
    print(format_row(done["original"]), flush=True)
    for spec in specs:
        if spec not in done:
            done[spec] = uptrain(spec, original, tokens, tok, tasks, args)
            append_row(results, done[spec])
        r = done[spec]
        print(format_row({"config": spec + " before", **r["before"]}), flush=True)
        print(format_row({"config": spec + f" after {r['train_steps']}", **r["after"]}) +
              f"  (train {r['train_seconds']:.0f}s)", flush=True)
    rows = [done["original"]] + [done[s] for s in specs]
    print(markdown(rows))
    unigram = unigram_ppl(args)
    print(f"unigram (train token frequencies) val ppl on the same tokens: {unigram:.0f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "recursive_uptrain", "model": args.model, "data": args.data,
                      "steps": args.steps, "tokens_per_step": args.train_seq_len * args.train_batch_size,
                      "lr": args.lr, "warmup_steps": args.warmup_steps, "grad_clip": args.grad_clip, "distill_weight": args.distill_weight,
                      "loop_exit_weight": args.loop_exit_weight, "calib_tokens": args.calib_tokens, "unigram_val_ppl": unigram, "max_tokens": args.max_tokens,
                      "seq_len": args.seq_len, "hellaswag_docs": args.hellaswag, "lambada_docs": args.lambada,
                      "threads": args.threads, "git": commit, "machine": platform.machine(),
                      "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
