"""One training run's state (`Run`) and its setup (`open_run`): inputs checked, model, objective,
optimizer and data built, a checkpoint restored. The loop that advances it is train/loop.py.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recursa.data.packed import read_tokens
from recursa.errors import RecursaError
from recursa.io import check_output_dir
from recursa.model import Decoder, load
from recursa.train import distributed as D
from recursa.train.build import build_model, build_objective
from recursa.train.checkpoint import find_checkpoint, load_trainer_state, set_rng_state
from recursa.train.config import TrainConfig
from recursa.train.data import Batches, data_vocab_size, val_batches, val_windows
from recursa.train.layer_dropout import make_forward
from recursa.train.losses import Objective
from recursa.train.run_files import check_resume, truncate_metrics


@dataclass
class Run:
    """Everything one training run holds, set up by `_open` and advanced by `_one_step`."""

    cfg: TrainConfig
    env: D.DistEnv
    parallel: str
    autocast: contextlib.AbstractContextManager
    model: Decoder
    wrapped: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    params: list
    batches: Batches
    windows: object                       # the fixed val windows [N, seq_len + 1]
    val: list
    train_tokens: object
    vocab_size: int
    resumed: bool
    step: int = 0
    elapsed0: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    clock: float = 0.0                    # elapsed seconds as all ranks agree on (the slowest rank's)
    val_loss: float | None = None
    last_val: int | None = None
    last_saved: int = 0
    curricula: list = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step * self.env.world_size

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0



def open_run(cfg: TrainConfig, env: D.DistEnv, make_objective) -> Run:
    """Check the inputs, build model + objective + optimizer + data, restore a checkpoint."""
    data_dir, out = Path(cfg.data), Path(cfg.out)
    if not data_dir.is_dir():
        raise RecursaError(f"data directory {data_dir} does not exist (run `recursa data prepare` first)")
    check_output_dir(out)
    vocab_size = data_vocab_size(data_dir)
    train_tokens, val_tokens = read_tokens(data_dir, "train"), read_tokens(data_dir, "val")
    ckpt = find_checkpoint(out)
    if ckpt is not None and not cfg.resume:
        raise RecursaError(f"{out} already holds a checkpoint: pass --resume to continue it or choose another --out")
    if ckpt is None and cfg.resume:
        raise RecursaError(f"--resume given but {out} holds no checkpoint")
    state = load_trainer_state(ckpt) if ckpt is not None else None
    if state is not None:
        check_resume(cfg, state.get("train_config"), ckpt)
    parallel = D.resolve_parallel(cfg.parallel, env)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and env.device.type == "cuda")
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    model = build_model(cfg, vocab_size, ckpt).to(env.device)
    objective = (make_objective or (lambda m, t: build_objective(cfg, m, t)))(model, _teacher(cfg, env, vocab_size))
    forward = make_forward(model, cfg.layer_drop, cfg.layer_drop_schedule)  # LayerSkip layer dropout if > 0
    wrapped = D.wrap_model(forward, parallel, env)
    params = [p for p in forward.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = Batches(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, env.rank, env.world_size, env.device)
    windows = val_windows(val_tokens, cfg.seq_len, cfg.eval_batches * cfg.batch_size * env.world_size)
    run = Run(cfg, env, parallel, autocast, model, wrapped, objective, optimizer, params, batches, windows,
              val_batches(windows, cfg.batch_size, env.rank, env.world_size, env.device), train_tokens, vocab_size,
              resumed=ckpt is not None,
              curricula=[t.fn.curriculum for t in objective.terms if hasattr(t.fn, "curriculum")])
    if state is not None:
        D.load_optimizer_state(wrapped, optimizer, state["optimizer"], parallel)
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        run.step, run.elapsed0 = int(state["step"]), float(state["elapsed"])
    run.last_saved = run.step
    if env.is_main:  # drops records after the checkpoint (and torn lines); a fresh run in a used dir starts clean
        truncate_metrics(out / "metrics.jsonl", run.step)
    out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    if env.is_main:
        print(f"recursa train: {model.num_params() / 1e6:.2f}M params, {run.tokens_per_step} tokens/step, "
              f"{env.world_size} rank(s), parallel={parallel}, device={env.device.type}, "
              f"{'bf16' if use_bf16 else 'fp32'}" + (f", resuming at step {run.step}" if ckpt else ""), flush=True)
    return run


def _teacher(cfg: TrainConfig, env: D.DistEnv, vocab_size: int) -> Decoder | None:
    if not cfg.distill_from:
        return None
    teacher = load(cfg.distill_from, device=env.device).requires_grad_(False)
    if teacher.cfg.vocab_size != vocab_size:
        raise RecursaError(f"teacher {cfg.distill_from} has vocab_size {teacher.cfg.vocab_size}, data uses {vocab_size}")
    return teacher
