"""`recursa train`: train or uptrain a model on a prepared (packed) corpus.

    recursa train --data data/corpus --out runs/demo --preset small --max-minutes 4
    recursa train --data data/corpus --out runs/demo --resume --max-minutes 4     # continue
    recursa train --data data/corpus --out runs/up --init runs/demo/model --max-steps 200
    recursa train --data data/corpus-smollm --out runs/rec --init models/smol-10x3 \
        --distill-from models/smollm2-135m --distill-weight 1 --loop-exit-weight 0.1 --max-minutes 10
    recursa train --data data/corpus-smollm --out runs/exits --init models/smollm2-135m \
        --exit-depths 10,20 --exit-own-norm --freeze-backbone --exit-weight 1 --max-steps 200
    recursa train --data data/corpus --out runs/mor --preset mor-tiny --max-minutes 4 --threads 1
    recursa train --data data/corpus --out runs/ee --preset small --exit-depths 2,4 --exit-weight 0.3 \
        --exit-curriculum rotational --exit-kd-weight 0.1 --max-minutes 4
    recursa train --data data/corpus --out runs/ls --preset small --exit-depths 2,4 --exit-weight 0.3 \
        --layer-drop 0.2 --max-minutes 4                                  # + LayerSkip layer dropout
    torchrun --standalone --nproc-per-node 2 -m recursa.cli train ... --parallel fsdp

Writes <out>/metrics.jsonl, <out>/checkpoint/, <out>/model/ and <out>/summary.json.
"""
from __future__ import annotations

import argparse

from recursa.cli import positive_int
from recursa.train.config import CURRICULA, DTYPES, LAYER_DROP_SCHEDULES, PARALLEL, SCHEDULES, TrainConfig


def _depths(text: str) -> list[int]:
    """'2,4' -> [2, 4] (the model config checks the range and the order)."""
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts like 2,4, got {text!r}") from None
    if not depths:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts like 2,4, got {text!r}")
    return depths


def register(subparsers) -> None:
    d = TrainConfig.__dataclass_fields__
    p = subparsers.add_parser("train", help="train a model on a packed corpus", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="directory from `recursa data prepare` (train.bin, val.bin)")
    p.add_argument("--out", required=True, help="run directory for metrics, checkpoints and the final model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model shape to train from scratch (default: tiny)")
    src.add_argument("--init", metavar="MODEL_DIR", help="start from saved weights (uptraining)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget; the lr schedule follows it")
    g = p.add_argument_group("optimization")
    for flag, typ in (("seq_len", int), ("batch_size", int), ("grad_accum", int), ("lr", float),
                      ("min_lr_ratio", float), ("weight_decay", float), ("beta1", float), ("beta2", float),
                      ("grad_clip", float), ("warmup_steps", int), ("decay_frac", float), ("seed", int)):
        g.add_argument("--" + flag.replace("_", "-"), type=typ, default=d[flag].default,
                       help=f"(default: {d[flag].default})")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="cosine or warmup-stable-decay")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    r = p.add_argument_group("evaluation, checkpoints, hardware")
    for flag in ("eval_every", "eval_batches", "save_every", "log_every"):
        r.add_argument("--" + flag.replace("_", "-"), type=int, default=d[flag].default,
                       help=f"(default: {d[flag].default})")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda")
    r.add_argument("--parallel", choices=PARALLEL, default="auto", help="under torchrun: ddp or fsdp")
    r.add_argument("--threads", type=positive_int, help="CPU intra-op threads (default: torch's choice); 1 helps on a busy shared CPU")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t = p.add_argument_group("distillation")
    t.add_argument("--distill-from", metavar="MODEL_DIR", help="teacher model (frozen, same vocabulary)")
    t.add_argument("--distill-weight", type=float, default=0.0, help="weight of KL(teacher || student)")
    t.add_argument("--distill-temperature", type=float, default=1.0)
    e = p.add_argument_group("recursive models (cycle / middle_cycle sharing)")
    e.add_argument("--loop-exit-weight", type=float, default=0.0,
                   help="weight of the summed CE at every intermediate loop's exit (0.1 in Bae et al.)")
    e.add_argument("--loop-exit-distill", type=float, default=0.0,
                   help="weight of the summed KL(final loop || intermediate loop exit)")
    x = p.add_argument_group("early exits (train/exit_losses.py)")
    x.add_argument("--exit-depths", type=_depths, metavar="D1,D2",
                   help="give the model exits after these many layers (fresh or --init model)")
    x.add_argument("--exit-own-norm", action="store_true", help="each exit gets its own RMSNorm (saved with the model)")
    x.add_argument("--exit-weight", type=float, default=0.0,
                   help="weight of the summed CE at the intermediate exits (the curriculum's scale with --exit-curriculum)")
    x.add_argument("--exit-curriculum", choices=CURRICULA, help="LayerSkip early-exit loss curriculum")
    x.add_argument("--exit-kd-weight", type=float, default=0.0,
                   help="weight of FREE's layer-wise hidden-state distillation to the first exit")
    x.add_argument("--freeze-backbone", action="store_true",
                   help="train only the exits' own norms (needs --exit-own-norm exits)")
    x.add_argument("--layer-drop", type=float, default=0.0,
                   help="LayerSkip layer dropout: per-sample drop rate of the last layer, rising from 0 at the first")
    x.add_argument("--layer-drop-schedule", choices=LAYER_DROP_SCHEDULES, default="exp",
                   help="how the drop rate rises with depth (default: exp, as LayerSkip)")
    m = p.add_argument_group("Mixture-of-Recursions routers (train/mor_losses.py; MoR presets only)")
    for flag in ("router_bce_weight", "router_z_weight", "router_balance_weight", "router_bias_rate"):
        m.add_argument("--" + flag.replace("_", "-"), type=float, default=d[flag].default,
                       help=f"(default: {d[flag].default})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recursa.train.loop import train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if fields.get("preset") is None and fields.get("init") is None and not fields.get("resume"):
        fields["preset"] = "tiny"   # a resumed run takes its model from the checkpoint
    train(TrainConfig(**fields))
    return 0
