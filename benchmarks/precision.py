"""What each weight format costs in quality and buys in speed, for SmolLM2-135M.

Quality per format (fp32, bf16, int8, int4 re-quantized from the fp32 weights, int4 from the
GGUF's own Q4_1 blocks): perplexity on the bundled validation text, and greedy agreement with
fp32 over >= 2,000 generated tokens, measured two ways:
- teacher-forced: fp32 generates; the other format reads the same tokens and its argmax is
  compared with fp32's at every generated position (no drift: each position counts once);
- free-running: the format generates on its own through the engine; share of tokens equal to
  fp32's at the same position, and of requests that stay identical to the end.
Speed per format: the whole weight set (30 fused layers + LM head, one call per matrix, random
weights of SmolLM2's shapes) at batch 1 and 32, as tokens/s (what a span could reach if weights
were all it did), fused and unfused; plus the engine's decode rate in the free-running run.

    recursa models fetch smollm2-135m --keep-int4
    recursa data prepare --tokenizer models/smollm2-135m --out data/corpus-smollm
    python benchmarks/precision.py --model models/smollm2-135m --data data/corpus-smollm
    python benchmarks/precision.py --kernels-only --threads 2              # speed table only

Prints a table per part and ends with one JSON line. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

# (name, dtype, quantization, LM head format): int4 is also tried with an int8 head (SmolLM2's GGUF
# keeps its tied embedding in Q8_0, i.e. 8 bits).
FORMATS = [("fp32", "float32", None, True), ("bf16", "bfloat16", None, True), ("int8", "bfloat16", "int8", True),
           ("int4", "bfloat16", "int4", True), ("int4+head8", "bfloat16", "int4", "int8"),
           ("int4-q4_1", "bfloat16", "int4", True), ("int4-q4_1+head8", "bfloat16", "int4", "int8")]


# ---- kernels ---------------------------------------------------------------------------------
def _weight_set(cfg, fmt: str, fused: bool):
    """Modules of every matrix a decode step multiplies by, in format `fmt` (random weights)."""
    from recursa.model.quant import quantized_linear

    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim
    per_layer = ([(q + 2 * kv, d), (d, q), (2 * f, d), (d, f)] if fused
                 else [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)])
    shapes = per_layer * cfg.n_layers + [(cfg.vocab_size, d)]
    gen = torch.Generator().manual_seed(0)
    mods = []
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        if fmt in ("fp32", "bf16"):
            lin = nn.Linear(k, n, bias=False)
            lin.weight = nn.Parameter(w.to(torch.float32 if fmt == "fp32" else torch.bfloat16), requires_grad=False)
            mods.append(lin)
        else:
            mods.append(quantized_linear(w, fmt))
    return mods


@torch.inference_mode()
def _rates(sets: dict, batch: int, dtype, rounds: int, clock) -> dict:
    """Median tokens/s of one pass over each weight set; the sets take turns round by round, so a
    load that comes and goes (a shared machine) hits them alike."""
    xs = {}
    for mods in sets.values():
        for m in mods:
            xs.setdefault(m.in_features, torch.randn(batch, m.in_features).to(dtype))
    times = {k: [] for k in sets}
    for r in range(rounds + 1):
        for key, mods in sets.items():
            start = clock()
            for m in mods:
                m(xs[m.in_features])
            if r:  # round 0 warms up
                times[key].append(clock() - start)
    return {k: batch / sorted(t)[len(t) // 2] for k, t in times.items()}


def kernels(cfg, rounds: int) -> list[dict]:
    """Wall-clock rates, and rates from the CPU time the process used (on a shared, oversubscribed
    machine wall time mostly measures waiting for a core; CPU time is what the kernel costs)."""
    rows = []
    for fmt in ("fp32", "bf16", "int8", "int4"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        sets = {fused: _weight_set(cfg, fmt, fused) for fused in (True, False)}
        rates = {(b, c): _rates(sets, b, dtype, rounds, clock)
                 for b in (1, 32) for c, clock in (("wall", time.perf_counter), ("cpu", time.process_time))}
        for fused, mods in sets.items():
            nbytes = sum(t.numel() * t.element_size() for m in mods for t in m.state_dict().values())
            row = {"format": fmt, "fused": fused, "weight_mb": nbytes / 2**20}
            for (b, c), r in rates.items():
                row[f"tok_s_b{b}_{c}"] = r[fused]
            row["gb_s_b1_cpu"] = row["tok_s_b1_cpu"] * nbytes / 1e9
            rows.append(row)
            print(f"{fmt:5s} {'fused' if fused else 'split':5s} {row['weight_mb']:7.1f} MB  per CPU second: batch 1 "
                  f"{row['tok_s_b1_cpu']:7.1f} tok/s ({row['gb_s_b1_cpu']:5.1f} GB/s), batch 32 "
                  f"{row['tok_s_b32_cpu']:7.1f} tok/s | wall: {row['tok_s_b1_wall']:7.1f} / {row['tok_s_b32_wall']:7.1f}",
                  flush=True)
        del sets
    return rows


# ---- quality ---------------------------------------------------------------------------------
def _prepared(base, name, dtype, quantization, head, model_dir):
    from recursa.model.quant import load_int4_weights, prepare

    blocks = None
    if "q4_1" in name:
        blocks = load_int4_weights(model_dir)
        if blocks is None:
            return None
    return prepare(copy.deepcopy(base), dtype, quantization, head=head, int4_weights=blocks)


@torch.inference_mode()
def _teacher_forced(model, seqs, prompt_lens, ref_tokens) -> tuple[int, int]:
    same = total = 0
    for ids, p, ref in zip(seqs, prompt_lens, ref_tokens):
        logits = model(torch.tensor([ids[:-1]]))[0, p - 1:]
        pred = logits.argmax(-1).tolist()
        same += sum(a == b for a, b in zip(pred, ref))
        total += len(ref)
    return same, total


def quality(args) -> list[dict]:
    import numpy as np

    from recursa import LLM, SamplingParams
    from recursa.data.packed import read_tokens
    from recursa.eval.perplexity import perplexity
    from recursa.model import load
    from recursa.model.quant import weight_bytes

    base = load(args.model)
    val = read_tokens(args.data, "val")
    rng = np.random.default_rng(0)
    starts = rng.choice(len(val) - args.prompt_len, size=args.prompts, replace=False)
    prompts = [[int(t) for t in val[s:s + args.prompt_len]] for s in starts]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows, ref = [], None
    formats = [f for f in FORMATS if args.formats is None or f[0] in args.formats.split(",")]
    for name, dtype, quantization, head in formats:
        model = _prepared(base, name, dtype, quantization, head, args.model)
        if model is None:
            print(f"{name}: no int4.safetensors in {args.model} (recursa models fetch --keep-int4); skipped")
            continue
        start = time.perf_counter()
        ppl = perplexity(model, val, args.seq_len, args.batch_size, args.ppl_tokens)
        ppl_s = time.perf_counter() - start
        llm = LLM(model, max_num_seqs=args.prompts, kv_cache_memory=2**28)
        start = time.perf_counter()
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        gen_s = time.perf_counter() - start
        row = {"format": name, "ppl": ppl["ppl"], "nll": ppl["nll"], "ppl_tokens": ppl["n_tokens"],
               "weight_mb": weight_bytes(model) / 2**20, "engine_tok_s": sum(map(len, outs)) / gen_s,
               "ppl_seconds": ppl_s}
        if ref is None:
            ref = outs
            row.update(tf_agree=1.0, free_agree=1.0, identical_requests=1.0, tokens=sum(map(len, outs)))
        else:
            same, total = _teacher_forced(model, [p + r for p, r in zip(prompts, ref)], [len(p) for p in prompts], ref)
            free = sum(a == b for r, o in zip(ref, outs) for a, b in zip(r, o))
            row.update(tf_agree=same / total, free_agree=free / sum(map(len, ref)),
                       identical_requests=sum(r == o for r, o in zip(ref, outs)) / len(ref), tokens=total)
        row["ppl_vs_fp32"] = row["ppl"] / rows[0]["ppl"] - 1 if rows else 0.0
        rows.append(row)
        print(f"{name:10s} ppl {row['ppl']:7.3f} ({row['ppl_vs_fp32']:+.2%})  teacher-forced agree "
              f"{row['tf_agree']:.4f}  free-running agree {row['free_agree']:.4f}  identical requests "
              f"{row['identical_requests']:.2f}  weights {row['weight_mb']:6.1f} MB  engine {row['engine_tok_s']:6.1f} tok/s "
              f"(32 concurrent)", flush=True)
        del model, llm
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--data", default="data/corpus-smollm")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--formats", default=None, help=f"comma-separated subset of {','.join(f[0] for f in FORMATS)} "
                                                    f"(fp32 first: the reference)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64, help="per prompt (32 x 64 = 2,048 compared tokens)")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7, help="timed passes per weight set and batch size (median)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from recursa.config import preset

    result = {"threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()[0]}
    if not args.quality_only:
        print(f"kernels: SmolLM2-135M weight set, {torch.get_num_threads()} threads")
        result["kernels"] = kernels(preset("135m"), args.rounds)
    if not args.kernels_only:
        print(f"quality: {args.model}, {args.prompts} prompts x {args.new_tokens} greedy tokens, "
              f"perplexity over {args.ppl_tokens} val tokens (windows of {args.seq_len})")
        result["quality"] = quality(args)
    result["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
