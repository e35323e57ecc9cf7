"""How good a model's exits are, depth by depth, on held-out text: agreement with the final layer,
cross-entropy of each exit, and the final layer's perplexity (issue 12, item 2: before and after
training exits with the model).

Teacher-forced windows of the corpus' val split (`--windows` x `--seq-len` tokens, the first ones,
fixed): one full forward each (`Decoder.forward_hidden`), then for every depth asked (`--depths`,
default the model's exits; `all`: every depth through the shared final norm, the "logit lens")
the exit's logits (`recursa.model.exits.exit_logits`: an own exit norm where the model has one),
and per token whether their argmax equals the final layer's (the quantity early exit must keep)
and the exit's CE on the next token. Run it on the model before and after training to compare:

    .venv/bin/python benchmarks/exit_agreement.py --model models/smollm2-135m --data data/corpus-smollm --depths 8,15
    .venv/bin/python benchmarks/exit_agreement.py --model runs/smol-layerskip/model --data data/corpus-smollm

Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F


def measure(model, windows: torch.Tensor, depths) -> dict:
    """{"depths": {d: {"agreement", "ce"}}, "final_ce", "final_ppl", "tokens"} over windows [W, T+1]."""
    from recursa.model.exits import exit_logits

    agree = {d: 0 for d in depths}
    ce = {d: 0.0 for d in depths}
    final_ce, tokens = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids, targets = row[None, :-1], row[1:]
            hidden = model.forward_hidden(ids)
            final = exit_logits(model, hidden[-1], model.depth)[0].float()
            top = final.argmax(-1)
            final_ce += F.cross_entropy(final, targets, reduction="sum").item()
            for d in depths:
                z = exit_logits(model, hidden[d], d)[0].float()
                agree[d] += int((z.argmax(-1) == top).sum())
                ce[d] += F.cross_entropy(z, targets, reduction="sum").item()
            tokens += targets.numel()
    return {"tokens": tokens, "final_ce": final_ce / tokens, "final_ppl": math.exp(final_ce / tokens),
            "depths": {d: {"agreement": agree[d] / tokens, "ce": ce[d] / tokens} for d in depths}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="prepared corpus (its val split)")
    ap.add_argument("--depths", default=None, help="comma-separated, or 'all' (default: the model's exits)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from recursa.data.packed import read_tokens
    from recursa.model import load
    from recursa.model.exits import ExitSpec

    model = load(args.model).eval()
    if args.depths == "all":
        depths = list(range(1, model.depth))
    elif args.depths:
        depths = [int(d) for d in args.depths.split(",")]
    else:
        depths = list(ExitSpec.from_config(model.cfg).depths)
    stream = torch.from_numpy(read_tokens(args.data, "val").astype("int64"))
    n = min(args.windows, (stream.numel() - 1) // args.seq_len)
    windows = torch.stack([stream[i * args.seq_len: i * args.seq_len + args.seq_len + 1] for i in range(n)])
    result = measure(model, windows, depths)
    print(f"{args.model}: {result['tokens']} val tokens, final layer CE {result['final_ce']:.4f} "
          f"(ppl {result['final_ppl']:.2f})")
    print(f"{'depth':>5} {'agreement':>10} {'CE':>8}")
    for d, r in result["depths"].items():
        print(f"{d:>5} {r['agreement']:>10.3f} {r['ce']:>8.3f}")
    print(json.dumps({"benchmark": "exit_agreement", "model": args.model, "data": args.data,
                      "windows": n, "seq_len": args.seq_len, **result}))


if __name__ == "__main__":
    main()
