"""Loss terms for early exits, for the training Objective: intermediate exits (ExitSpec) and the
loop ends of recursive models.

The final exit's CE stays the ordinary `ce` term; these terms add the intermediate exits:

    exit_ce           Σ_e w_e · CE(exit e)  — weighted multi-exit cross-entropy (weights per exit,
                      default 1 each; Bae et al. use 0.1 for intermediate exits beside a final 1.0).
    exit_hidden_kd    FREE's layer-wise distillation: the shallow model is the first S layers
                      (S = the first exit), the deep one all L. Shallow layer i (1..S) is matched
                      to deep layer m(i) = floor(i·L/S), so m(S) = L, and
                      mean_i MSE(hidden[i], stop_grad(hidden[m(i)])) over the raw residual states
                      (hidden[i] = after i layers). The deep side teaches, it is not pulled back.
    exit_ce_curriculum  LayerSkip's early-exit loss with a curriculum over which exits get loss
                      at training step t (`ExitCurriculum`, whose `step` the loop sets each optimizer
                      step): Σ_{e active at t} s_e · CE(exit e) with s_e = scale · T(e) / T(L),
                      T(n) = n(n+1)/2 — weight grows with depth, relative to the final CE's 1.
                      "rotational": exit k (of n, ascending) is active when t mod period == k mod period;
                      "gradual": exit e becomes active once t >= ramp_steps·(L − e)/L (deep exits first,
                      all active from ramp_steps on); "all": always active.

Exit logits are computed once per batch and shared (outputs["exit_logits"], {depth: logits}).

Loop-end exits of recursive models (cycle / middle_cycle sharing) are exits at the loop-end
depths: after loop r the hidden state goes through the coda layers (middle_cycle: the last
unique layer; none for cycle) and the shared final norm + LM head. Post-training for early exit
(Bae et al. 2025) adds to the final loop's CE:

    loop_exit_ce       Σ over intermediate loops r < N-1 of CE(exit r)             weight λ = 0.1
    loop_exit_distill  Σ over r < N-1 of KL(final loop's softmax || exit r's)      (optional)

The final loop's distribution is detached: it teaches the exits, the exits do not pull it back.
Their logits are shared per batch under outputs["loop_exit_logits"].

    terms = [LossTerm("ce", 1.0, next_token_ce), *exit_terms(spec, ce_weight=1.0, kd_weight=0.1)]
    terms += loop_exit_terms(model, weight=0.1, distill_weight=1.0)
    recursa train --init models/smol-10x3 --data data/corpus-smollm --out runs/ee --loop-exit-weight 0.1
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recursa.errors import RecursaError
from recursa.model.exits import ExitHeads, ExitSpec, exit_logits
from recursa.train.config import CURRICULA
from recursa.train.data import Batch
from recursa.train.losses import LossTerm

NEEDS = frozenset({"logits", "hidden"})


def _exit_logits(model: nn.Module, outputs: dict, depths, heads: ExitHeads | None) -> dict[int, torch.Tensor]:
    cache = outputs.setdefault("exit_logits", {})
    for e in depths:
        if e not in cache:
            cache[e] = exit_logits(model, outputs["hidden"][e], e, heads)
    return cache


def _ce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten())


def multi_exit_ce(spec: ExitSpec, weights: tuple[float, ...] | None = None, heads: ExitHeads | None = None):
    """Σ_e w_e · CE at each intermediate exit of `spec`."""
    weights = tuple(weights) if weights is not None else (1.0,) * len(spec.depths)
    if len(weights) != len(spec.depths):
        raise RecursaError(f"{len(weights)} exit weights for {len(spec.depths)} exits {list(spec.depths)}")

    def fn(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
        spec.check(model.depth)
        logits = _exit_logits(model, outputs, spec.depths, heads)
        return sum(w * _ce(logits[e], batch) for e, w in zip(spec.depths, weights))

    return fn


def matched_layers(shallow: int, deep: int) -> list[tuple[int, int]]:
    """FREE's layer matching: (shallow depth i, deep depth floor(i·L/S)) for i = 1..S."""
    return [(i, i * deep // shallow) for i in range(1, shallow + 1)]


def _rms(h: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(h.float(), (h.shape[-1],), eps=1e-6)


def hidden_distill(spec: ExitSpec):
    """Mean over matched pairs of MSE(shallow hidden, detached deep hidden) (FREE), on RMS-normalised
    states: the raw residual stream grows with depth, and pulling a shallow layer towards a deep
    one's *scale* feeds back into the deep one (trained from scratch, the raw MSE ran away to 1e6
    within 30 steps); the direction is what an exit head reads after its norm anyway."""

    def fn(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
        spec.check(model.depth)
        hidden = outputs["hidden"]
        pairs = matched_layers(spec.depths[0], model.depth)
        return sum(F.mse_loss(_rms(hidden[i]), _rms(hidden[j].detach())) for i, j in pairs) / len(pairs)

    return fn


@dataclass
class ExitCurriculum:
    """Which exits get loss at the current step and with which scale (LayerSkip)."""

    spec: ExitSpec
    kind: str = "all"
    period: int = 1          # rotational
    ramp_steps: int = 1      # gradual
    scale: float = 1.0
    step: int = 0            # set by the training loop before each optimizer step

    def __post_init__(self):
        if self.kind not in CURRICULA:
            raise RecursaError(f"unknown exit curriculum {self.kind!r}; choose from {', '.join(CURRICULA)}")
        if self.period < 1 or self.ramp_steps < 1:
            raise RecursaError(f"curriculum period and ramp_steps must be >= 1, got {self.period}, {self.ramp_steps}")

    def active(self, n_layers: int) -> list[int]:
        depths = self.spec.depths
        if self.kind == "rotational":
            return [e for k, e in enumerate(depths) if self.step % self.period == k % self.period]
        if self.kind == "gradual":
            return [e for e in depths if self.step * n_layers >= self.ramp_steps * (n_layers - e)]
        return list(depths)

    def weight(self, depth: int, n_layers: int) -> float:
        return self.scale * depth * (depth + 1) / (n_layers * (n_layers + 1))


def curriculum_ce(curriculum: ExitCurriculum, heads: ExitHeads | None = None):
    """Σ over the curriculum's active exits of their depth-growing scale times CE (0 when none active).

    The returned function carries the curriculum as `fn.curriculum`; the training loop sets its
    `step` before every optimizer step."""

    def fn(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
        curriculum.spec.check(model.depth)
        active = curriculum.active(model.depth)
        if not active:
            return outputs["logits"].sum() * 0.0  # keeps every parameter in the graph (DDP)
        logits = _exit_logits(model, outputs, active, heads)
        return sum(curriculum.weight(e, model.depth) * _ce(logits[e], batch) for e in active)

    fn.curriculum = curriculum
    return fn


def exit_terms(spec: ExitSpec, *, ce_weight: float = 1.0, exit_weights: tuple[float, ...] | None = None,
               kd_weight: float = 0.0, curriculum: ExitCurriculum | None = None,
               heads: ExitHeads | None = None) -> list[LossTerm]:
    """The exit loss terms to add beside `ce` (terms with weight 0 / no curriculum are left out)."""
    terms = []
    if ce_weight > 0:
        terms.append(LossTerm("exit_ce", ce_weight, multi_exit_ce(spec, exit_weights, heads), needs=NEEDS))
    if kd_weight > 0:
        terms.append(LossTerm("exit_hidden_kd", kd_weight, hidden_distill(spec), needs=NEEDS))
    if curriculum is not None:
        terms.append(LossTerm("exit_ce_curriculum", 1.0, curriculum_ce(curriculum, heads), needs=NEEDS))
    return terms


# ---- loop-end exits of recursive models ---------------------------------------------------------

def loop_exit_logits(model: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits [B,T,V] of every intermediate loop's exit (r = 0..N-2), coda layers included."""
    s = model.structure()
    T = hidden[0].shape[1]
    cos, sin = model.rope(torch.arange(T, device=hidden[0].device), hidden[0].dtype)
    exits = []
    for end in s.loop_ends[:-1]:
        # hidden[0] is the embedding, hidden[d + 1] the output of depth d
        exits.append(model.head(model.run_depths(hidden[end + 1], s.coda, cos, sin)))
    return exits


def _loop_exits(model: nn.Module, outputs: dict) -> list[torch.Tensor]:
    if "loop_exit_logits" not in outputs:
        outputs["loop_exit_logits"] = loop_exit_logits(model, outputs["hidden"])
    return outputs["loop_exit_logits"]


def loop_exit_ce(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    """Sum over intermediate loops of the mean next-token CE at that loop's exit."""
    return sum(_ce(z, batch) for z in _loop_exits(model, outputs))


def loop_exit_distill(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
    """Sum over intermediate loops of KL(final exit || loop exit) per token, the final one detached."""
    teacher = F.log_softmax(outputs["logits"].detach().float(), dim=-1).flatten(0, 1)
    return sum(F.kl_div(F.log_softmax(z.float(), dim=-1).flatten(0, 1), teacher, log_target=True,
                        reduction="batchmean") for z in _loop_exits(model, outputs))


def loop_exit_terms(model: nn.Module, weight: float = 0.1, distill_weight: float = 0.0) -> list[LossTerm]:
    """The loop-end exit terms to add to the objective (none when both weights are 0)."""
    if weight <= 0 and distill_weight <= 0:
        return []
    s = model.structure()
    if s.sharing not in ("cycle", "middle_cycle") or s.n_loops < 2:
        raise RecursaError(f"loop-end exits need a model with cycle or middle_cycle sharing and n_loops >= 2; "
                           f"this one has sharing={s.sharing!r}, n_loops={model.cfg.n_loops}")
    terms = []
    if weight > 0:
        terms.append(LossTerm("loop_exit_ce", weight, loop_exit_ce, needs=NEEDS))
    if distill_weight > 0:
        terms.append(LossTerm("loop_exit_distill", distill_weight, loop_exit_distill, needs=NEEDS))
    return terms


__all__ = ["multi_exit_ce", "matched_layers", "hidden_distill", "ExitCurriculum", "curriculum_ce", "exit_terms",
           "CURRICULA", "loop_exit_logits", "loop_exit_ce", "loop_exit_distill", "loop_exit_terms"]
