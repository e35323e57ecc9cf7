"""What `recursa train` trains: the model (fresh preset, --init weights or the checkpoint), its
objective (the loss terms the flags ask for), and a plain saveable copy of it at the end.

Used by train/loop.py; `build_objective` is also the default `make_objective` of `train()`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from recursa.config import ConfigError

from recursa.presets import preset
from recursa.errors import RecursaError
from recursa.model import Decoder, load
from recursa.model.exits import ExitSpec, with_exits
from recursa.train import distributed as D
from recursa.train.config import TrainConfig
from recursa.train.exit_losses import ExitCurriculum, exit_terms, loop_exit_terms
from recursa.train.losses import Objective, default_objective
from recursa.train.mor_losses import mor_terms


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
        model = Decoder(preset(cfg.preset, vocab_size=vocab_size, **(exits or {})))
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


def decoder_to_save(model: Decoder, wrapped, parallel: str) -> Decoder | None:
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
