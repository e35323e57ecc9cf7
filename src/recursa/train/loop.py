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

Stopping early: Ctrl-C or SIGTERM ends the step, writes a checkpoint and raises `Interrupted`
(train/signals.py), so `--resume` continues exactly; a second signal quits at once. A loss or
gradient norm that is not finite stops before the optimizer applies it, saves the last good
state as the checkpoint and raises a RecursaError naming the step.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from recursa.errors import RecursaError
from recursa.model import Decoder
from recursa.train import distributed as D
from recursa.train.build import decoder_to_save
from recursa.train.checkpoint import find_checkpoint, rng_state, save_checkpoint
from recursa.train.config import TrainConfig
from recursa.train.data import unigram_loss
from recursa.train.losses import Objective
from recursa.train.run import Run, open_run
from recursa.train.run_files import append_record, write_summary
from recursa.train.schedule import lr_factor, progress
from recursa.train.signals import Interrupted, StopOnSignal

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


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
    run = open_run(cfg, env, make_objective)
    with StopOnSignal(announce=env.is_main) as stop:
        _loop(run, stop, on_step)
        if stop.requested:
            _save(run)
            raise Interrupted(stop.signum, f"checkpoint saved at step {run.step} in {run.out / 'checkpoint'}; "
                                           f"--resume continues it")
        return _finish(run)


# ---- the loop --------------------------------------------------------------------------------
def _loop(run: Run, stop: StopOnSignal, on_step) -> None:
    cfg, env = run.cfg, run.env
    show = cfg.progress and env.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not show, unit="step", dynamic_ncols=True)
    log = open(run.out / "metrics.jsonl", "a") if env.is_main else None
    run.t0 = time.perf_counter()
    try:
        while not _should_stop(run, stop):
            record = _one_step(run)
            if cfg.eval_every and run.step % cfg.eval_every == 0:
                _eval(run, record)
            if log is not None and (run.step % cfg.log_every == 0 or "val_loss" in record):
                append_record(log, record)
            if cfg.save_every and run.step % cfg.save_every == 0:
                _save(run)
            left = None if cfg.max_minutes is None else max(0.0, 60 * cfg.max_minutes - record["elapsed"])
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **({"left": f"{left / 60:.1f}m"} if left is not None else {}), refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(run.step, record)
    finally:
        bar.close()
        if log is not None:
            log.close()


def _should_stop(run: Run, stop: StopOnSignal) -> bool:
    """End of budget or a signal; decided on the slowest rank's clock and any rank's signal, so all agree."""
    cfg = run.cfg
    flags = torch.tensor([run.elapsed(), float(stop.requested)], dtype=torch.float64)
    elapsed, signalled = D.all_reduce(flags, "max").tolist()
    run.clock = elapsed
    if signalled:
        stop.signum = stop.signum or signal.SIGINT   # another rank got it: stop here too
        return True
    return (cfg.max_steps is not None and run.step >= cfg.max_steps) or \
        (cfg.max_minutes is not None and elapsed >= 60 * cfg.max_minutes)


def _one_step(run: Run) -> dict:
    """One optimizer step over grad_accum micro-batches; its metrics record."""
    cfg, step = run.cfg, run.step
    lr = cfg.lr * lr_factor(cfg.schedule, step, progress(step, cfg.warmup_steps, cfg.max_steps, run.clock,
                            cfg.max_minutes), cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_frac)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    for curriculum in run.curricula:
        curriculum.step = step
    t_step = time.perf_counter()
    sums = torch.zeros(len(run.objective.terms) + 1, dtype=torch.float64)
    for micro in range(cfg.grad_accum):
        batch = run.batches.next()
        no_sync = run.parallel == "ddp" and micro < cfg.grad_accum - 1
        with (run.wrapped.no_sync() if no_sync else contextlib.nullcontext()):
            with run.autocast:
                total, values = run.objective(run.wrapped, run.model, batch)
            (total / cfg.grad_accum).backward()
        sums += torch.stack([total.detach(), *values.values()]).double().cpu() / cfg.grad_accum
    D.all_reduce(sums, "mean")
    grad_norm = None
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not math.isfinite(float(sums[0])) or (grad_norm is not None and not math.isfinite(grad_norm)):
        _diverged(run, "loss" if not math.isfinite(float(sums[0])) else "gradient norm",
                  float(sums[0]) if not math.isfinite(float(sums[0])) else grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    dt = time.perf_counter() - t_step
    return {"step": run.step, "loss": float(sums[0]),
            **{name: float(v) for name, v in zip(run.objective.names, sums[1:].tolist())},
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": run.tokens_per_step / dt,
            "tokens": run.step * run.tokens_per_step, "elapsed": run.elapsed()}


def _diverged(run: Run, what: str, value: float) -> None:
    """The step's update is not applied: save the weights as they are (the last good state), then stop."""
    run.optimizer.zero_grad(set_to_none=True)
    _save(run)
    raise RecursaError(f"the {what} became {value} at step {run.step + 1}: training stopped before applying it; "
                       f"the last good state (step {run.step}) is in {run.out / 'checkpoint'} "
                       f"(lower --lr or check the data, then --resume)")


def _eval(run: Run, record: dict) -> None:
    run.val_loss = record["val_loss"] = evaluate(run.wrapped, run.val, run.autocast)
    run.last_val = run.step
    if run.env.is_main:
        tqdm.write(f"step {run.step}: loss {record['loss']:.4f} val_loss {run.val_loss:.4f} "
                   f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s", file=sys.stdout)


def _save(run: Run) -> None:
    """Atomic checkpoint of the current step (every rank calls: FSDP gathers)."""
    plain = decoder_to_save(run.model, run.wrapped, run.parallel)
    opt_state = D.full_optimizer_state(run.wrapped, run.optimizer, run.parallel)
    if run.env.is_main:
        save_checkpoint(run.out, plain, {"step": run.step, "optimizer": opt_state, "data": run.batches.state_dict(),
                                         "rng": rng_state(), "elapsed": run.elapsed(),
                                         "train_config": run.cfg.to_dict(), "parallel": run.parallel,
                                         "world_size": run.env.world_size})
    run.last_saved = run.step
    D.barrier()


# ---- the end ---------------------------------------------------------------------------------
def _finish(run: Run) -> dict:
    """Final val loss, checkpoint, model directory and summary.json."""
    cfg, env, out = run.cfg, run.env, run.out
    if run.last_val != run.step or run.val_loss is None:
        run.val_loss = evaluate(run.wrapped, run.val, run.autocast)
        if env.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                append_record(f, {"step": run.step, "val_loss": run.val_loss, "elapsed": run.elapsed()})
    if not math.isfinite(run.val_loss):
        _save(run)
        raise RecursaError(f"the final val loss is {run.val_loss}: the model diverged; not written to {out / 'model'}")
    if run.last_saved != run.step or find_checkpoint(out) is None:
        _save(run)
    plain = decoder_to_save(run.model, run.wrapped, run.parallel)
    summary = None
    if env.is_main:
        plain.save(out / "model")
        for name in TOKENIZER_FILES:
            if (Path(cfg.data) / name).is_file():
                shutil.copyfile(Path(cfg.data) / name, out / "model" / name)
        unigram = unigram_loss(run.train_tokens, run.windows[:, 1:], run.vocab_size)
        val_loss = run.val_loss
        summary = {"step": run.step, "tokens": run.step * run.tokens_per_step, "elapsed": run.elapsed(),
                   "val_loss": val_loss, "unigram_loss": unigram, "beats_unigram": val_loss < unigram,
                   "params": run.model.num_params(), "model_dir": str(out / "model")}
        write_summary(out / "summary.json", summary)
        print(f"final val loss {val_loss:.4f} nats/token | unigram baseline {unigram:.4f} "
              f"({'beats' if val_loss < unigram else 'does NOT beat'} unigram) | model saved to {out / 'model'}",
              flush=True)
    D.barrier()
    return summary
