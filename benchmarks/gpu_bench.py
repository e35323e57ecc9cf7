"""A short GPU benchmark of the engine (run by scripts/gpu_check.sh; a few minutes on one GPU).

SmolLM2-135M decoded greedily through `recursa.LLM` on CUDA at batch 1, 32 and 128 (random
token-id prompts of 8-48 tokens, --new-tokens each), in bf16 where the engine takes `dtype=`
(else in fp32, said in the row), then the same 30-layer shape with early exits and as a
Mixture-of-Recursions model where the engine has them. SmolLM2's weights come from --model when
that directory exists (a GPU machine often has no network for `recursa models fetch`); otherwise
a randomly initialised model of the same shape stands in: every row's timing is the same for
random weights, except that early-exit rows then use threshold 0 (every token leaves at the first
exit: the bound of what exits can save) and MoR rows a fresh router.

    python benchmarks/gpu_bench.py --model models/smollm2-135m --out $OUT/gpu_bench.json

Prints one line per row as it goes (so a cut-off run still leaves figures), a table, and one JSON
line; --out also writes the JSON there. Stops starting rows after --budget seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import recursa
from recursa import SamplingParams
from recursa.presets import preset
from recursa.model import Decoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import random_prompts  # noqa: E402  (the peer benchmark's seeded prompts)

SHAPES = {"135m": ("135m", "mor-135m"), "tiny": ("tiny", "mor-tiny")}  # (vanilla/exits, MoR) presets


def make_llm(model, dtype: str, **kw):
    """recursa.LLM in `dtype` when the engine takes dtype=, else the model cast by hand (fp32 kept)."""
    try:
        return recursa.LLM(model, dtype=dtype, **kw), dtype
    except TypeError:
        return recursa.LLM(model, **kw), "float32 (engine has no dtype=)"


def timed(llm, batch: list[list[int]], new_tokens: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(batch[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(batch, sp)
    sync()
    secs = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    depths = [d for o in outs for d in (o.exit_depths or [])]
    return {"seconds": round(secs, 3), "tokens": n, "tok_s": n / secs,
            "mean_depth": sum(depths) / len(depths) if depths else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds after which no new row starts")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script's logic (with --shape tiny)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="135m", help="the random stand-in's shape")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (torch.cuda.is_available() is False)")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    real = (Path(args.model) / "config.json").is_file()
    shape, mor_shape = SHAPES[args.shape]
    base = recursa.load(args.model) if real else Decoder(preset(shape)).eval()
    source = args.model if real else f"random init, preset {shape}"
    exits = [base.cfg.n_layers // 3, 2 * base.cfg.n_layers // 3]
    models = [("vanilla", base, None)]
    try:
        from recursa.engine.exit_policy import ExitPolicy
        from recursa.engine.thresholds import Fixed
        from recursa.model.exits import ExitSpec

        ee = Decoder(base.cfg.replace(exit_depths=exits)).eval()
        ee.load_state_dict(base.state_dict(), strict=False)  # same backbone; shared-head exits
        models.append((f"early exit {exits[0]},{exits[1]} (thr {0.9 if real else 0})", ee,
                       ExitPolicy(ExitSpec.from_config(ee.cfg), "max_prob", Fixed(0.9 if real else 0.0))))
    except Exception as e:  # noqa: BLE001 - an engine without exits: the row says why
        print(f"early exit rows skipped: {e}", flush=True)
    try:
        models.append((f"MoR {mor_shape} (random)", Decoder(preset(mor_shape)).eval(), None))
    except Exception as e:  # noqa: BLE001
        print(f"MoR rows skipped: {e}", flush=True)

    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for name, model, policy in models:
        model = model.to(args.device)
        for b in batches:
            if time.perf_counter() - t_start > args.budget:
                print(f"budget of {args.budget:.0f} s spent: {name} batch {b} not run", flush=True)
                continue
            llm, kw = None, dict(max_num_seqs=max(batches), max_num_batched_tokens=8192, exit_policy=policy)
            try:
                llm, used = make_llm(model, args.dtype, **kw)
                res = timed(llm, random_prompts(b, model.cfg.vocab_size, 0), args.new_tokens, args.device)
            except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                res, used = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}, args.dtype
            row = {"model": name, "batch": b, "dtype": used, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del llm
        model.to("cpu")
        if args.device == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'model':<32}{'batch':>6}{'tok/s':>10}{'depth':>7}  dtype")
    for r in rows:
        depth = "-" if r.get("mean_depth") is None else f"{r['mean_depth']:.1f}"
        tok = f"{r['tok_s']:.1f}" if "tok_s" in r else r.get("error", "")
        print(f"{r['model']:<32}{r['batch']:>6}{tok:>10}{depth:>7}  {r['dtype']}")
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
    doc = {"benchmark": "gpu_bench", "device": device, "torch": torch.__version__,
           "weights": source, "new_tokens": args.new_tokens, "seconds": round(time.perf_counter() - t_start), "rows": rows}
    print(json.dumps(doc))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
