"""The one training loop for every recursa model family.

    train(TrainConfig(data="data/corpus", out="runs/demo", preset="small", max_minutes=4))

Per optimizer step: set the lr from the schedule, run `grad_accum` micro-batches through the
Objective (named loss terms, each logged), clip, AdamW step. Every `eval_every` steps and at the
end: loss on a fixed set of val windows. Every `save_every` steps and at the end: an atomic
checkpoint (rank 0 writes; FSDP states are gathered first). At the end: `<out>/model/` (weights,
config, tokenizer files), `<out>/summary.json` with the final val loss next to the unigram
baseline. Single process, or one process per rank under torchrun (see distributed.py).

Exact resume (fp32): the checkpoint holds weights, optimizer state, data position and RNG
states, and the lr is a pure function of the step, so steps k+1..N after a resume repeat the
uninterrupted run bit for bit. With --max-minutes the schedule follows wall time and is not
repeatable by nature.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from recursa.config import PRESETS, ConfigError, preset
from recursa.data.packed import read_tokens
from recursa.errors import RecursaError
from recursa.model import Decoder, load
from recursa.model.exits import ExitSpec, with_exits
from recursa.train import distributed as D
from recursa.train.checkpoint import find_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from recursa.train.config import TrainConfig
from recursa.train.data import Batches, data_vocab_size, unigram_loss, val_batches, val_windows
from recursa.train.losses import Objective, default_objective
from recursa.train.mor_losses import mor_terms
from recursa.train.exit_losses import ExitCurriculum, exit_terms, loop_exit_terms
from recursa.train.layer_dropout import make_forward
from recursa.train.schedule import lr_factor, progress

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint by the interrupted run."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def build_model(cfg: TrainConfig, vocab_size: int, resume_from: Path | None) -> Decoder:
    """The decoder to train: from the checkpoint, from --init weights, or a fresh seeded preset.

    --exit-depths sets the exits of a fresh or --init model; a resumed one keeps its own (the flag
    may repeat them). --freeze-backbone leaves only the exit norms trainable."""
    exits = None if cfg.exit_depths is None else dict(exit_depths=list(cfg.exit_depths),
                                                          exit_own_norm=cfg.exit_own_norm)
    if resume_from is not None or cfg.init is not None:
        model = load(resume_from or cfg.init)
        source = resume_from or cfg.init
        if exits and resume_from is not None:
            have = dict(exit_depths=model.cfg.exit_depths, exit_own_norm=model.cfg.exit_own_norm)
            if have != exits:
                raise RecursaError(f"the checkpoint in {cfg.out} has exits {have}; a resumed run cannot change "
                                   f"them to {exits}")
        elif exits:
            try:
                with_exits(model, exits["exit_depths"], exits["exit_own_norm"])
            except ConfigError as e:
                raise RecursaError(f"--exit-depths for the model at {source}: {e}") from None
    else:
        torch.manual_seed(cfg.seed)
        max_len = max(PRESETS[cfg.preset].get("max_seq_len", cfg.seq_len), cfg.seq_len)
        model = Decoder(preset(cfg.preset, vocab_size=vocab_size, max_seq_len=max_len, **(exits or {})))
        source = None
    if model.cfg.vocab_size != vocab_size:
        raise RecursaError(f"model at {source} has vocab_size {model.cfg.vocab_size} but the data in "
                           f"{cfg.data} uses {vocab_size}: tokenize with the model's tokenizer")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise RecursaError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if cfg.freeze_backbone:
        if model.exit_heads is None:
            raise RecursaError("--freeze-backbone trains only the exits' own norms, and this model has none: "
                               "add --exit-own-norm (with --exit-depths)")
        model.requires_grad_(False)
        model.exit_heads.requires_grad_(True)
    return model.train()


def build_objective(cfg: TrainConfig, model: Decoder, teacher: Decoder | None) -> Objective:
    """The objective the flags ask for: CE, + KL to a teacher, + loop-end exit terms, + exit terms.

    Exit terms use the model's own exits (cfg.exit_depths): --exit-weight weighs their summed CE,
    or, with --exit-curriculum, is the scale of LayerSkip's curriculum (rotational: one exit per
    step in turn; gradual: exits switch on deep-first over the first half of --max-steps)."""
    base = default_objective(teacher, cfg.distill_weight, cfg.distill_temperature)
    extra = loop_exit_terms(model, cfg.loop_exit_weight, cfg.loop_exit_distill)
    extra += mor_terms(model, cfg.router_bce_weight, cfg.router_z_weight, cfg.router_balance_weight,
                       cfg.router_bias_rate)  # router losses of a Mixture-of-Recursions model (else none)
    if cfg.exit_weight > 0 or cfg.exit_kd_weight > 0:
        spec = ExitSpec.from_config(model.cfg)
        if not spec.depths:
            raise RecursaError("--exit-weight/--exit-kd-weight need a model with exits: give --exit-depths")
        curriculum = None
        if cfg.exit_curriculum is not None:
            curriculum = ExitCurriculum(spec, cfg.exit_curriculum, period=len(spec.depths),
                                        ramp_steps=max(1, (cfg.max_steps or 1) // 2), scale=cfg.exit_weight)
        extra += exit_terms(spec, ce_weight=0.0 if curriculum else cfg.exit_weight, kd_weight=cfg.exit_kd_weight,
                            curriculum=curriculum)
    return Objective(base.terms + extra, base.teacher) if extra else base


def _decoder_to_save(model: Decoder, wrapped, parallel: str) -> Decoder | None:
    """A plain CPU-saveable decoder on rank 0 (gathers FSDP shards: call on every rank)."""
    if parallel != "fsdp":
        return model
    state = D.full_model_state(wrapped, parallel)
    if not state:
        return None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    with torch.device("meta"):
        plain = Decoder(model.cfg)
    plain.load_state_dict(state, assign=True)
    plain.inv_freq = model.inv_freq.detach().cpu()
    return plain


@torch.no_grad()
def evaluate(wrapped, batches: list, autocast) -> float:
    """Mean token CE over this rank's val batches, averaged over all ranks by token count."""
    total = torch.zeros(2, dtype=torch.float64)
    for b in batches:
        with autocast:
            logits = wrapped(b.inputs)["logits"]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b.targets.flatten(), reduction="sum")
        total += torch.tensor([loss.item(), b.num_tokens], dtype=torch.float64)
    D.all_reduce(total)
    return float(total[0] / total[1])


def train(cfg: TrainConfig, make_objective: Callable[[Decoder, Decoder | None], Objective] | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train as `cfg` says; returns the summary dict (also written to <out>/summary.json).

    make_objective(model, teacher) builds the loss terms (default: `build_objective`).
    on_step(step, record) runs on every rank after each step and its checkpoint.
    """
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    env = D.init_distributed(cfg.device)
    try:
        return _train(cfg, env, make_objective, on_step)
    finally:
        if owns_group:
            D.shutdown()


def _train(cfg, env, make_objective, on_step) -> dict:
    data_dir, out = Path(cfg.data), Path(cfg.out)
    if not data_dir.is_dir():
        raise RecursaError(f"data directory {data_dir} does not exist (run `recursa data prepare` first)")
    train_tokens, val_tokens = read_tokens(data_dir, "train"), read_tokens(data_dir, "val")
    vocab_size = data_vocab_size(data_dir)
    ckpt = find_checkpoint(out)
    if ckpt is not None and not cfg.resume:
        raise RecursaError(f"{out} already holds a checkpoint: pass --resume to continue it or choose another --out")
    if ckpt is None and cfg.resume:
        raise RecursaError(f"--resume given but {out} holds no checkpoint")
    parallel = D.resolve_parallel(cfg.parallel, env)
    device = env.device
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    model = build_model(cfg, vocab_size, ckpt).to(device)
    teacher = None
    if cfg.distill_from:
        teacher = load(cfg.distill_from, device=device).requires_grad_(False)
        if teacher.cfg.vocab_size != vocab_size:
            raise RecursaError(f"teacher {cfg.distill_from} has vocab_size {teacher.cfg.vocab_size}, data uses {vocab_size}")
    objective = (make_objective or (lambda m, t: build_objective(cfg, m, t)))(model, teacher)
    curricula = [t.fn.curriculum for t in objective.terms if hasattr(t.fn, "curriculum")]  # exit loss schedules
    forward = make_forward(model, cfg.layer_drop, cfg.layer_drop_schedule)  # LayerSkip layer dropout if > 0
    wrapped = D.wrap_model(forward, parallel, env)
    params = [p for p in forward.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = Batches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, env.rank, env.world_size, device)
    windows = val_windows(val_tokens, cfg.seq_len, cfg.eval_batches * cfg.batch_size * env.world_size)
    val = val_batches(windows, cfg.batch_size, env.rank, env.world_size, device)

    step, elapsed0 = 0, 0.0
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        D.load_optimizer_state(wrapped, optimizer, state["optimizer"], parallel)
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, elapsed0 = int(state["step"]), float(state["elapsed"])
    if env.is_main:  # a fresh run in a dir left by a run killed before its first checkpoint starts clean
        _truncate_metrics(metrics_path, step)
    out.mkdir(parents=True, exist_ok=True)
    D.barrier()

    def save(step: int, elapsed: float) -> None:
        plain = _decoder_to_save(model, wrapped, parallel)
        opt_state = D.full_optimizer_state(wrapped, optimizer, parallel)
        if env.is_main:
            save_checkpoint(out, plain, {"step": step, "optimizer": opt_state, "data": batches.state_dict(),
                                         "rng": rng_state(), "elapsed": elapsed, "train_config": cfg.to_dict(),
                                         "parallel": parallel, "world_size": env.world_size})
        D.barrier()

    global_tokens = cfg.tokens_per_step * env.world_size
    if env.is_main:
        print(f"recursa train: {model.num_params() / 1e6:.2f}M params, {global_tokens} tokens/step, "
              f"{env.world_size} rank(s), parallel={parallel}, device={device.type}, "
              f"{'bf16' if use_bf16 else 'fp32'}" + (f", resuming at step {step}" if ckpt else ""), flush=True)
    show = cfg.progress and env.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not show, unit="step", dynamic_ncols=True)
    log = open(metrics_path, "a") if env.is_main else None
    t0, last_val, last_saved, val_loss = time.perf_counter(), None, step, None
    try:
        while True:
            # stop and schedule decisions use the slowest rank's clock so every rank agrees
            clock = torch.tensor([elapsed0 + time.perf_counter() - t0], dtype=torch.float64)
            elapsed = float(D.all_reduce(clock, "max"))
            if (cfg.max_steps is not None and step >= cfg.max_steps) or \
                    (cfg.max_minutes is not None and elapsed >= 60 * cfg.max_minutes):
                break
            lr = cfg.lr * lr_factor(cfg.schedule, step, progress(step, cfg.warmup_steps, cfg.max_steps, elapsed,
                                    cfg.max_minutes), cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_frac)
            for g in optimizer.param_groups:
                g["lr"] = lr
            for curriculum in curricula:
                curriculum.step = step
            t_step = time.perf_counter()
            sums = torch.zeros(len(objective.terms) + 1, dtype=torch.float64)
            for micro in range(cfg.grad_accum):
                batch = batches.next()
                no_sync = parallel == "ddp" and micro < cfg.grad_accum - 1
                with (wrapped.no_sync() if no_sync else contextlib.nullcontext()):
                    with autocast:
                        total, values = objective(wrapped, model, batch)
                    (total / cfg.grad_accum).backward()
                sums += torch.stack([total.detach(), *values.values()]).double().cpu() / cfg.grad_accum
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            D.all_reduce(sums, "mean")
            dt = time.perf_counter() - t_step
            elapsed = elapsed0 + time.perf_counter() - t0
            record = {"step": step, "loss": float(sums[0]),
                      **{name: float(v) for name, v in zip(objective.names, sums[1:].tolist())},
                      "lr": lr, "grad_norm": grad_norm, "tokens_per_s": global_tokens / dt,
                      "tokens": step * global_tokens, "elapsed": elapsed}
            if cfg.eval_every and step % cfg.eval_every == 0:
                val_loss = record["val_loss"] = evaluate(wrapped, val, autocast)
                last_val = step
                if env.is_main:
                    tqdm.write(f"step {step}: loss {record['loss']:.4f} val_loss {val_loss:.4f} "
                               f"lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s", file=sys.stdout)
            if log is not None and (step % cfg.log_every == 0 or "val_loss" in record):
                log.write(json.dumps(record) + "\n")
                log.flush()
            if cfg.save_every and step % cfg.save_every == 0:
                save(step, elapsed)
                last_saved = step
            left = None if cfg.max_minutes is None else max(0.0, 60 * cfg.max_minutes - elapsed)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"left": f"{left / 60:.1f}m"} if left is not None else {}), refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, record)
    finally:
        bar.close()
        if log is not None:
            log.close()

    elapsed = elapsed0 + time.perf_counter() - t0
    if last_val != step or val_loss is None:
        val_loss = evaluate(wrapped, val, autocast)
        if env.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "val_loss": val_loss, "elapsed": elapsed}) + "\n")
    if last_saved != step or find_checkpoint(out) is None:
        save(step, elapsed)
    plain = _decoder_to_save(model, wrapped, parallel)
    summary = None
    if env.is_main:
        plain.save(out / "model")
        for name in TOKENIZER_FILES:
            if (data_dir / name).is_file():
                shutil.copyfile(data_dir / name, out / "model" / name)
        unigram = unigram_loss(train_tokens, windows[:, 1:], vocab_size)
        summary = {"step": step, "tokens": step * global_tokens, "elapsed": elapsed, "val_loss": val_loss,
                   "unigram_loss": unigram, "beats_unigram": val_loss < unigram,
                   "params": model.num_params(), "model_dir": str(out / "model")}
        _write_json(out / "summary.json", summary)
        print(f"final val loss {val_loss:.4f} nats/token | unigram baseline {unigram:.4f} "
              f"({'beats' if val_loss < unigram else 'does NOT beat'} unigram) | model saved to {out / 'model'}",
              flush=True)
    D.barrier()
    return summary
