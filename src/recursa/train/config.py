"""TrainConfig: every knob of `recursa train` in one dataclass, checked before any work starts.

The CLI maps its flags one to one onto these fields; Python users build a TrainConfig directly
and call `recursa.train.train(cfg)`. Fields are saved into each checkpoint so a run can be audited.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from recursa.presets import PRESETS
from recursa.errors import RecursaError

CURRICULA = ("all", "rotational", "gradual")  # exit loss curricula (train/exit_losses.py)
LAYER_DROP_SCHEDULES = ("exp", "linear")      # LayerSkip drop rate over depth (train/layer_dropout.py)

SCHEDULES = ("cosine", "wsd")
PARALLEL = ("auto", "none", "ddp", "fsdp")
DTYPES = ("auto", "fp32", "bf16")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class TrainConfigError(RecursaError, ValueError):
    """A training option that cannot work; the message names the option."""


@dataclass(slots=True)
class TrainConfig:
    data: str                        # directory with train.bin/val.bin (+ tokenizer files)
    out: str                         # run directory: metrics.jsonl, checkpoint/, model/, summary.json
    preset: str | None = "tiny"      # model shape (vocab_size comes from the data) ...
    init: str | None = None          # ... or a saved model directory to start from (uptraining)
    seq_len: int = 256
    batch_size: int = 16             # sequences per micro-batch per rank
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 disables clipping
    warmup_steps: int = 20
    schedule: str = "cosine"
    decay_frac: float = 0.2          # WSD: fraction of the run spent in the linear cooldown
    max_steps: int | None = None
    max_minutes: float | None = None
    eval_every: int = 100            # 0: only at the end
    eval_batches: int = 4            # val windows = eval_batches * batch_size (fixed set)
    save_every: int = 0              # 0: only at the end
    log_every: int = 1
    seed: int = 1337
    dtype: str = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    parallel: str = "auto"           # auto: ddp under torchrun with >1 rank, none otherwise
    resume: bool = False
    progress: bool = True            # tqdm bar (rank 0, TTY only)
    distill_from: str | None = None  # teacher model directory
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    loop_exit_weight: float = 0.0    # recursive models: λ · Σ CE at intermediate loop ends (0.1 in Bae et al.)
    loop_exit_distill: float = 0.0   # ... + weight · Σ KL(final loop || loop r) (train/exit_losses.py)
    exit_depths: list[int] | None = None  # set the model's exit depths (None: keep the model's own)
    exit_own_norm: bool = False      # ... with an own RMSNorm per exit
    exit_weight: float = 0.0         # weight of the intermediate exits' CE (train/exit_losses.py) ...
    exit_curriculum: str | None = None  # ... or the scale of LayerSkip's curriculum: all | rotational | gradual
    exit_kd_weight: float = 0.0      # FREE layer-wise hidden-state distillation to the first exit
    freeze_backbone: bool = False    # train only the exit norms (needs own-norm exits)
    layer_drop: float = 0.0          # LayerSkip layer dropout: drop rate of the last layer (0 at the first)
    layer_drop_schedule: str = "exp"  # ... rising over depth: exp | linear (train/layer_dropout.py)
    router_bce_weight: float = 0.001   # Mixture-of-Recursions (train/mor_losses.py): expert-choice BCE
    router_z_weight: float = 1e-5      # ... router z-loss
    router_balance_weight: float = 0.1  # ... token-choice balancing loss (mor_balance="loss")
    router_bias_rate: float = 1e-3     # ... token-choice loss-free bias step (mor_balance="bias")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in fields(self):   # NaN and inf pass every comparison below (nan < 0 is False): refuse them first
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise TrainConfigError(f"{f.name} must be a finite number, got {v}")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise TrainConfigError(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")

        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise TrainConfigError(f"{name} must be a positive integer, got {v!r}")

        def non_negative(name, integer=False):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (integer and not isinstance(v, int)):
                raise TrainConfigError(f"{name} must be >= 0, got {v!r}")

        for name in ("seq_len", "batch_size", "grad_accum", "eval_batches", "log_every"):
            positive_int(name)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            non_negative(name, integer=True)
        for name in ("weight_decay", "grad_clip", "distill_weight", "loop_exit_weight", "loop_exit_distill",
                     "exit_weight", "exit_kd_weight", "router_bce_weight", "router_z_weight",
                     "router_balance_weight", "router_bias_rate"):
            non_negative(name)
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise TrainConfigError(f"lr must be positive, got {self.lr!r}")
        for name in ("min_lr_ratio", "decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.distill_temperature > 0:
            raise TrainConfigError(f"distill_temperature must be positive, got {self.distill_temperature!r}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLEL:
            raise TrainConfigError(f"unknown parallel mode {self.parallel!r}; choose from {', '.join(PARALLEL)}")
        if self.dtype not in DTYPES:
            raise TrainConfigError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.max_steps is None and self.max_minutes is None:
            raise TrainConfigError("give --max-steps and/or --max-minutes: training needs an end")
        if self.max_steps is not None:
            positive_int("max_steps")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise TrainConfigError(f"max_minutes must be positive, got {self.max_minutes!r}")
        if self.preset is not None and self.init is not None or \
                (self.preset is None and self.init is None and not self.resume):  # a resume may name neither
            raise TrainConfigError("give exactly one of --preset (train from scratch) or --init MODEL_DIR (uptrain)")
        if self.preset is not None and self.preset not in PRESETS:
            raise TrainConfigError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.preset is not None and self.seq_len > PRESETS[self.preset]["max_seq_len"]:
            raise TrainConfigError(f"--seq-len {self.seq_len} exceeds the {self.preset} preset's max_seq_len "
                                   f"{PRESETS[self.preset]['max_seq_len']}")
        if self.distill_weight > 0 and not self.distill_from:
            raise TrainConfigError("--distill-weight needs --distill-from MODEL_DIR (the teacher)")
        if self.distill_from and self.distill_weight == 0:
            raise TrainConfigError("--distill-from needs a positive --distill-weight")
        self._validate_exits()

    def _validate_exits(self) -> None:
        if self.exit_curriculum is not None:
            if self.exit_curriculum not in CURRICULA:
                raise TrainConfigError(f"unknown exit_curriculum {self.exit_curriculum!r}; "
                                       f"choose from {', '.join(CURRICULA)}")
            if not self.exit_weight > 0:
                raise TrainConfigError("--exit-curriculum needs a positive --exit-weight (the curriculum's scale)")
            if self.exit_curriculum == "gradual" and self.max_steps is None:
                raise TrainConfigError("--exit-curriculum gradual needs --max-steps (it ramps over the first half)")
        if not isinstance(self.layer_drop, (int, float)) or not 0 <= self.layer_drop < 1:
            raise TrainConfigError(f"layer_drop must be in [0, 1), got {self.layer_drop!r}")
        if self.layer_drop_schedule not in LAYER_DROP_SCHEDULES:
            raise TrainConfigError(f"unknown layer_drop_schedule {self.layer_drop_schedule!r}; "
                                   f"choose from {', '.join(LAYER_DROP_SCHEDULES)}")
        if self.layer_drop > 0 and self.freeze_backbone:
            raise TrainConfigError("--layer-drop trains the backbone to do without its deep layers; "
                                   "it does nothing useful with --freeze-backbone")
        if self.exit_own_norm and not self.exit_depths:
            raise TrainConfigError("--exit-own-norm needs --exit-depths")
        if self.freeze_backbone:
            if not self.exit_weight > 0:
                raise TrainConfigError("--freeze-backbone trains only the exit norms: give a positive --exit-weight")
            if self.exit_curriculum == "gradual":
                raise TrainConfigError("--freeze-backbone with --exit-curriculum gradual leaves early steps with "
                                       "nothing to train; use all or rotational")
            if self.exit_kd_weight > 0:
                raise TrainConfigError("--exit-kd-weight trains the backbone's shallow layers; "
                                       "it does nothing with --freeze-backbone")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one rank (multiply by world size for the global figure)."""
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)
