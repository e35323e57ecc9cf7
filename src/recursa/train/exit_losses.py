"""Loss terms for models with intermediate exits (ExitSpec), for the training Objective.

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

    terms = [LossTerm("ce", 1.0, next_token_ce), *exit_terms(spec, ce_weight=1.0, kd_weight=0.1)]
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


def hidden_distill(spec: ExitSpec):
    """Mean over matched pairs of MSE(shallow hidden, detached deep hidden) (FREE)."""

    def fn(model: nn.Module, batch: Batch, outputs: dict) -> torch.Tensor:
        spec.check(model.depth)
        hidden = outputs["hidden"]
        pairs = matched_layers(spec.depths[0], model.depth)
        return sum(F.mse_loss(hidden[i].float(), hidden[j].detach().float()) for i, j in pairs) / len(pairs)

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


__all__ = ["multi_exit_ce", "matched_layers", "hidden_distill", "ExitCurriculum", "curriculum_ce", "exit_terms",
           "CURRICULA"]
